"""Running commands and moving files through the guest agent (guest-exec, guest-file-*): no
network and no SSH keys in the guest, only qemu-guest-agent.

guest-exec starts a command and returns a pid; the agent keeps its output in memory and
guest-exec-status gives it back, base64, once the command has exited. The agent keeps at most
16 MiB of each stream (GUEST_EXEC_MAX_OUTPUT in QEMU's qga) and says so (out-truncated): a
caller learns that, it is never silent. Files go through guest-file-open/read/write/close in
bounded chunks, each one base64 on one JSON line.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cbsd.errors import QemuError
from cbsd.qemu import agent as agent_helper
from cbsd.qemu.agent import Agent

# One guest-file-read/write: small enough that a request line stays well under the agent's
# JSON limits, large enough that a few MiB take a few dozen round trips.
CHUNK = 1 << 20
# How often guest-exec-status is asked while the command runs: quick at first (most
# commands take milliseconds), then every POLL_MAX seconds.
POLL_MIN, POLL_MAX = 0.02, 0.5


@dataclass(frozen=True)
class Finished:
    exitcode: int  # 128 + N for a command killed by signal N, as a shell reports it
    out: bytes
    err: bytes
    truncated: bool  # the agent dropped output beyond its cap


class StillRunning(QemuError):
    """The command did not exit before the deadline (it goes on in the guest)."""


def run(agent: Agent, argv: list[str], timeout: float) -> Finished:
    """Run *argv* in the guest, wait up to *timeout* seconds for it to exit."""
    started = agent.call("guest-exec", path=argv[0], arg=argv[1:], **{"capture-output": True})
    pid = started["pid"]
    deadline = time.monotonic() + timeout
    pause = POLL_MIN
    while True:
        st = agent.call("guest-exec-status", pid=pid)
        if st.get("exited"):
            break
        if time.monotonic() >= deadline:
            raise StillRunning(f"the command (guest pid {pid}) still runs after {timeout:g} s")
        time.sleep(pause)
        pause = min(POLL_MAX, pause * 2)
    code = st.get("exitcode")
    if code is None:
        code = 128 + int(st.get("signal", 0))
    return Finished(int(code), _b64(st.get("out-data")), _b64(st.get("err-data")),
                    bool(st.get("out-truncated") or st.get("err-truncated")))


def _b64(data: Any) -> bytes:
    return base64.b64decode(data) if data else b""


def read_file(agent: Agent, path: str, sink: Callable[[bytes], object]) -> int:
    """Copy the guest's *path* to *sink*, chunk by chunk; -> the number of bytes."""
    handle = agent.call("guest-file-open", path=path, mode="r")
    total = 0
    try:
        while True:
            got = agent.call("guest-file-read", handle=handle, count=CHUNK)
            data = _b64(got.get("buf-b64"))
            if data:
                sink(data)
                total += len(data)
            if got.get("eof") or not data:
                return total
    finally:
        agent.call("guest-file-close", handle=handle)


def write_file(agent: Agent, path: str, source: Callable[[int], bytes]) -> int:
    """Write what *source(CHUNK)* yields (until b"") to the guest's *path*, created or
    truncated; -> the number of bytes."""
    handle = agent.call("guest-file-open", path=path, mode="w")
    total = 0
    try:
        while data := source(CHUNK):
            while data:
                got = agent.call("guest-file-write", handle=handle,
                                 **{"buf-b64": base64.b64encode(data).decode()})
                n = int(got.get("count", 0))
                if n <= 0:
                    raise QemuError(f"the guest agent wrote nothing to {path}")
                total += n
                data = data[n:]
        agent.call("guest-file-flush", handle=handle)
    finally:
        agent.call("guest-file-close", handle=handle)
    return total


RUN_TIMEOUT = 120.0  # seconds the agent helper lets a script it runs in the guest take


def main(args: list[str]) -> int:
    """The agent helper (qemu/agent.py) given `run SCRIPT`: it also runs SCRIPT in the guest
    once the agent answers, and records its exit code and output."""
    rest = args[3:]
    script = rest[rest.index("run") + 1]

    def then(agent: Agent) -> dict[str, Any]:
        try:
            done = run(agent, ["/bin/sh", "-c", script], RUN_TIMEOUT)
        except QemuError as e:
            return {"exitcode": None, "error": str(e), "at": time.time()}
        return {"exitcode": done.exitcode, "out": done.out.decode(errors="replace")[-2000:],
                "err": done.err.decode(errors="replace")[-2000:], "at": time.time()}

    return agent_helper.main(args, then)
