"""Background operations: the long work an API request starts (state changes, checkpoints,
clones), each with an id, a status, progress, a cancel, and its result or error.

Each runs in its own thread with its own Context (SQLite connections are per thread) and its
own cancel token (cbsd.cancel.scope): DELETE /1.0/operations/{id} cancels that one only, at the
core's next cancel.check(), where the CLI's Ctrl-C would -- the core rolls back the same way.

They live in this process's memory only: a restarted service has forgotten them. The work they
did is on disk; one killed halfway leaves what a killed CLI command leaves (the VM's lock file
names the dead holder), and the next command on that VM recovers it (core/vm/recovery.py).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cbsd import cancel
from cbsd.core.cluster import guard
from cbsd.core.vm.context import Context
from cbsd.errors import BusyError, Cancelled, describe
from cbsd.storage.paths import Workdir

KEEP_FINISHED = 500  # finished operations kept for GET (the oldest forgotten first)

Progress = Callable[[int, int], None]
Work = Callable[[Context, Progress], Any]


@dataclass
class Operation:
    id: str
    description: str
    instances: list[str]
    status: str = "Running"  # Running, Success, Failure, Cancelled
    err: str = ""
    exit_code: int = 0
    result: Any = None
    done: int = 0
    total: int = 0
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    token: cancel.Token = field(default_factory=cancel.Token)
    finished: threading.Event = field(default_factory=threading.Event)

    def as_json(self) -> dict[str, Any]:
        progress = None
        if self.total:
            progress = {"percent": min(100, self.done * 100 // self.total), "done": self.done,
                        "total": self.total}
        return {"id": self.id, "description": self.description, "status": self.status,
                "progress": progress, "err": self.err, "result": self.result,
                "resources": {"instances": self.instances},
                "created_at": self.created_at, "updated_at": self.updated_at}


class Operations:
    """Every operation of this service run. *notify(op)* is called on each change (the event
    stream publishes it), from the operation's thread."""

    def __init__(self, workdir: Workdir, notify: Callable[[Operation], None]) -> None:
        self.workdir = workdir
        self.notify = notify
        self._ops: dict[str, Operation] = {}
        self._lock = threading.Lock()

    def start(self, description: str, instances: list[str], work: Work) -> Operation:
        """Run *work(ctx, progress)* in a thread of its own. A VM an operation of this service
        is already changing is busy (BusyError -> 409) before anything starts; another
        process's command on it is found by the VM's lock inside the work, as the CLI's is."""
        op = Operation(uuid.uuid4().hex, description, instances)
        with self._lock:
            for other in self._ops.values():
                clash = set(other.instances) & set(instances)
                if other.status == "Running" and clash:
                    raise BusyError(f"{sorted(clash)[0]}: busy: the service is running "
                                    f"'{other.description}' on it (operation {other.id})")
            self._ops[op.id] = op
            self._forget_old()
        # Its start is published before its thread runs: a thread that ended first (a quick
        # failure on a loaded host) would otherwise publish its end before its start, and
        # the start would then be published with the end's status (the metrics lost it).
        self.notify(op)
        threading.Thread(target=self._run, args=(op, work), name=f"op-{op.id[:8]}",
                         daemon=True).start()
        return op

    def _run(self, op: Operation, work: Work) -> None:
        cancel.scope(op.token)
        last = [0.0]

        def progress(done: int, total: int) -> None:
            op.done, op.total = done, total
            now = time.monotonic()
            if now - last[0] >= 0.2 or done >= total:  # at most 5 events a second
                last[0] = now
                op.updated_at = time.time()
                self.notify(op)

        ctx = None
        try:
            ctx = Context(self.workdir)
            guard.install_if_node(ctx)  # the CLI's ownership guard, on a cluster node
            op.result = work(ctx, progress)
            op.status = "Success"
        except BaseException as e:  # an operation's failure, whatever it is, is its err
            op.err, op.exit_code = describe(e)
            op.status = "Cancelled" if isinstance(e, Cancelled) else "Failure"
        finally:
            if ctx is not None and "inventory" in ctx.__dict__:
                ctx.inventory.close()
            op.updated_at = time.time()
            op.finished.set()
            self.notify(op)

    def get(self, op_id: str) -> Operation | None:
        return self._ops.get(op_id)

    def all(self) -> list[Operation]:
        with self._lock:
            return list(self._ops.values())

    def cancel(self, op: Operation, reason: str = "cancelled through the API") -> None:
        if not op.finished.is_set():
            op.token.cancel(reason)

    def _forget_old(self) -> None:
        done = [o for o in self._ops.values() if o.finished.is_set()]
        for o in sorted(done, key=lambda o: o.updated_at)[:max(0, len(done) - KEEP_FINISHED)]:
            del self._ops[o.id]
