"""Takeover on the standby (docs/cluster.md, "Fencing and failover"). The keeper's watch round
hands every read of the cluster to Standby.round: for each VM whose record names this node as
its HA standby (`"ha": {"node": ME}`) while another node owns it and whose recorded status is
"On" (the owner did not leave it stopped or hibernated), the owner's alive key must
have stayed gone for a margin (the owner fenced itself before its lease could expire) and a
published replica must be here (core/cluster/replica.latest). Then a child process
(`python -m cbsd.core.cluster.takeover WORKDIR JNAME OWNER REVISION`) does the work, so the
keeper's lease renewal never waits for it:

1. one compare-and-swap: the record as read (its mod revision) AND the owner's alive key
   absent -> the record names this node, with "takeover": OWNER (work in progress);
2. replica.promote(): the replica becomes a VM of this node's inventory, a checkpoint;
3. that checkpoint restored, running (bstart checkpoint=, through the ownership guard);
4. "takeover" dropped from the record ("taken_from": OWNER stays: the old owner's keeper
   kills its copy if it runs, its guard lets only bremove of the copy run there).

A child cut short (kill -9, a host crash) leaves the record naming this node with "takeover":
the next round starts the child again without the swap (REVISION 0), whatever the record's
"ha" says by then (the promoted definition's guard writes none) and with no replica needed
(promote removed it once the VM was in the inventory), and promote is idempotent. One child
per VM at a time (a lock file), and a failed one is retried only after RETRY seconds (a
broken replica does not spin)."""

from __future__ import annotations

import fcntl
import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cbsd.core.cluster import config, fence, guard, nodes, replica
from cbsd.core.cluster.store import Compare, Put, Store
from cbsd.core.vm.context import Context
from cbsd.core.vm.machine import VM
from cbsd.detach import start_detached
from cbsd.errors import CbsdError, StateError
from cbsd.storage.paths import Workdir

RETRY = 30.0  # seconds before a failed takeover of the same VM is tried again


class Replicas(Protocol):
    """What takeover asks of the replica (core/cluster/replica.py, issue 25 part 2)."""

    def latest(self, wd: Workdir, jname: str) -> object | None: ...

    def promote(self, ctx: Context, jname: str) -> str: ...


def replicas() -> Replicas:
    return replica


@dataclass(frozen=True)
class Action:
    jname: str
    owner: str     # the node it is taken from
    revision: int  # the record's mod revision as read; 0: resume a takeover cut short


def decide(records: dict[str, tuple[dict[str, Any], int]], up: set[str], me: str,
           gone: dict[str, float], now: float, margin_s: float) -> list[Action]:
    """The takeovers due now. *records*: jname -> (record, mod revision); *up*: nodes whose
    alive key exists; *gone*: owner -> when it was first seen down (updated here: a node
    back up is forgotten, so a blip never adds up to a takeover)."""
    for node in [n for n in gone if n in up]:
        del gone[node]
    due = []
    for jname, (rec, rev) in sorted(records.items()):
        owner = str(rec.get("node", ""))
        if owner == me and rec.get("takeover"):
            # a takeover cut short or failed: resumed whatever the record says since (the
            # promote's guard writes the promoted definition's ha, none, and status)
            due.append(Action(jname, str(rec["takeover"]), 0))
            continue
        ha = rec.get("ha")
        if not isinstance(ha, dict) or ha.get("node") != me or owner == me:
            continue
        if owner in up or not owner or rec.get("status") != "On":
            continue  # a VM its owner left stopped or hibernated stays so (not resumed)
        first = gone.setdefault(owner, now)
        if fence.takeover_due(first, now, margin_s):
            due.append(Action(jname, owner, rev))
    return due


class Standby:
    """The standby's part of the keeper: decides each round, starts one child per takeover."""

    def __init__(self, wd: Workdir, me: str, ttl: int, log: Callable[[str], None], *,
                 clock: Callable[[], float] = time.monotonic,
                 has_replica: Callable[[str], bool] | None = None,
                 spawn: Callable[[Action], subprocess.Popen[bytes] | None] | None = None
                 ) -> None:
        self.wd, self.me, self.log, self.clock = wd, me, log, clock
        self.margin = fence.margin(ttl)
        self.gone: dict[str, float] = {}
        self.children: dict[str, subprocess.Popen[bytes] | None] = {}
        self.failed: dict[str, float] = {}  # jname -> when its last child failed
        self.has_replica = has_replica or self._published
        self.spawn = spawn or self._spawn

    def _published(self, jname: str) -> bool:
        try:
            return replicas().latest(self.wd, jname) is not None
        except CbsdError as e:  # one damaged replica must not stop the others' takeovers
            self.log(f"{jname}: no takeover: {e}")
            return False

    def _spawn(self, a: Action) -> subprocess.Popen[bytes]:
        return start_detached([sys.executable, "-m", "cbsd.core.cluster.takeover",
                               str(self.wd.root), a.jname, a.owner, str(a.revision)])

    def round(self, snap: nodes.Snapshot) -> None:
        now = self.clock()
        for jname, child in list(self.children.items()):
            code = child.poll() if child is not None else 0
            if code is not None:
                del self.children[jname]
                if code:
                    self.failed[jname] = now
                    self.log(f"takeover of {jname} failed (exit {code}): again in {RETRY} s")
        records = {j: (kv.json(), kv.mod_revision) for j, kv in snap.vms.items()}
        for a in decide(records, set(snap.alive), self.me, self.gone, now, self.margin):
            if a.jname in self.children or now - self.failed.get(a.jname, -RETRY) < RETRY:
                continue
            if a.revision and not self.has_replica(a.jname):
                continue  # nothing to resume from: the VM stays down with its owner
            # (a resume needs none: its promote may have consumed the replica already)
            self.log(f"taking {a.jname} over from node {a.owner}")
            self.children[a.jname] = self.spawn(a)


def take(ctx: Context, store: Store, me: str, a: Action, reps: Replicas) -> str:
    """The child's work (see the module's docstring); what it did. A refusal (a VM of that
    name here, the record changed) is a StateError: the child fails, and the round waits
    RETRY before it tries again, as after any failure."""
    key = nodes.VM + a.jname
    if a.revision:
        if ctx.inventory.get(a.jname) is not None:
            # a VM of that name here (a copy this node was once the owner of) would be
            # taken for the promoted one: the operator removes it first
            raise StateError(f"{a.jname}: a VM of that name is in this node's inventory "
                             "already: no takeover (bremove it here first)")
        kv = store.get(key)
        if kv is None or kv.mod_revision != a.revision:
            raise StateError(f"{a.jname}: its record changed since it was read: no takeover")
        # "takeover": in progress (dropped at the end); "taken_from": for good -- the old
        # owner's keeper kills its copy, and only bremove of that copy runs there
        new = {**kv.json(), "node": me, "takeover": a.owner, "taken_from": a.owner,
               "last": f"taken over from {a.owner}", "time": time.time()}
        if not store.txn([Compare(key, a.revision), Compare(nodes.ALIVE + a.owner, 0)],
                         [Put(key, json.dumps(new).encode())]):
            raise StateError(f"{a.jname}: its record changed, or node {a.owner} came back: "
                             "no takeover")
    checkpoint = reps.promote(ctx, a.jname)
    # lazy: the restore path (the checkpoint engine) only in a takeover's child
    from cbsd.core.manage import lifecycle

    if not VM.load(ctx, a.jname).alive():  # a run cut short after the restore: done already
        lifecycle.start(ctx, a.jname, checkpoint=checkpoint)
    kv = store.get(key)
    if kv is None or kv.json().get("node") != me:
        raise StateError(f"{a.jname}: the record no longer names this node after the "
                         "takeover")
    done = {k: v for k, v in kv.json().items() if k != "takeover"}
    store.txn([Compare(key, kv.mod_revision)], [Put(key, json.dumps(done).encode())])
    return f"{a.jname}: taken over from node {a.owner}, restored from {checkpoint}"


def main(argv: list[str]) -> int:
    wd = Workdir(Path(argv[0]))
    a = Action(argv[1], argv[2], int(argv[3]))
    cfg = config.load(wd)
    if cfg is None:
        return 1
    lock = config.folder(wd) / f"takeover-{a.jname}.lock"
    with open(lock, "a") as held:
        try:
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return 0  # another child is at it
        ctx = Context(wd)
        guard.install(ctx)
        try:
            msg = take(ctx, config.store(wd, cfg), cfg.node, a, replicas())
        except Exception as e:
            config.append_log(config.keeper_log(wd), f"{time.time():.3f} takeover of "
                              f"{a.jname}: {e}")
            return 1
        config.append_log(config.keeper_log(wd), f"{time.time():.3f} {msg}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
