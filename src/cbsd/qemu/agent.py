"""QEMU's guest agent (qemu-guest-agent in the guest), over the VM's virtio-serial channel.

The protocol is QMP's framing without a greeting: one JSON request per line, one reply. A
client first sends `guest-sync-delimited` with a random id and skips everything up to the
0xFF byte the agent puts before its answer, so a reply left over from an earlier client is
never taken for this one. An agent that is not running (no agent installed, guest still
booting, guest paused) leaves the connection silent: every call has a deadline.

`python -m cbsd.qemu.agent SOCKET STATEFILE SECONDS [settime]` is the helper cbsd starts,
detached, after a VM boots, restores or resumes, after `bpause mode=off` and after a
checkpoint's stop: it waits up to SECONDS for the agent, sets the guest's clock from the
host's (settime: the guest's clock stood still with its vCPUs, so it is behind by the
checkpoint's age, the time hibernated or paused, or the checkpoint's own stop), and records
what the agent reports (its IPv4 address, for bls) in STATEFILE. With `run SCRIPT` it also
runs SCRIPT with /bin/sh in the guest (guest-exec, by agent_exec's entry point; a restored
clone's new machine-id and SSH host keys, core/checkpoint/identity.py) and records its exit
code and output as "ran". The
command that started it does not wait for it.

bpause's quick lane (cbsd/core/pause.py) starts the helper too, so this module imports at
the top only what the lane has loaded anyway (os, sys, time, contextlib, cbsd.errors): json
and pathlib are imported where they are used, and the helper is started with os.posix_spawn,
not subprocess (each of those costs the lane more than its whole work).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time

from cbsd import debug
from cbsd.errors import QemuError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path
    from typing import Any

    from cbsd.qemu.qmp import Monitor

# How long the helper waits for the agent when it is to set the clock: a guest left paused
# is served once it runs, and a loaded host may take a while to run it.
SETTIME_WAIT = 120.0
# How long one attempt to reach the agent waits for its handshake: a silent channel (no agent,
# guest still booting) is tried again soon rather than waited on.
HANDSHAKE_WAIT = 3.0
# What a user without an agent can do instead (after a pause or a checkpoint's stop).
SET_IT_YOURSELF = ("install qemu-guest-agent in the guest, or set the clock there "
                   "(e.g. 'systemctl restart chrony')")


class Agent:
    def __init__(self, path: str, timeout: float = 5.0) -> None:
        # lazy: the pause lane and bls (read_state) import this module but open no agent
        import socket

        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._sock.settimeout(timeout)
        self._buf = b""
        try:
            self._sock.connect(path)
            token = int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
            self._sock.sendall(b"\xff" + _line({"execute": "guest-sync-delimited",
                                                "arguments": {"id": token}}))
            self._skip_to_delimiter()
            if self._reply() != token:
                raise QemuError("the guest agent answered another client's request")
        except (OSError, ValueError) as e:
            self.close()
            raise QemuError(f"the guest agent does not answer ({e})") from e
        except QemuError:
            self.close()
            raise

    def _skip_to_delimiter(self) -> None:
        while (i := self._buf.find(b"\xff")) < 0:
            self._buf = b""
            self._recv()
        self._buf = self._buf[i + 1:]

    def _recv(self) -> None:
        chunk = self._sock.recv(65536)
        if not chunk:
            raise ConnectionError("the agent's channel closed")
        self._buf += chunk

    def _reply(self) -> Any:
        # Search only the bytes not searched yet: a reply can be megabytes (guest-exec-status
        # with a command's output, guest-file-read), and rescanning the whole buffer on every
        # 64 KiB read would be quadratic.
        scanned = 0
        while (end := self._buf.find(b"\n", scanned)) < 0:
            scanned = len(self._buf)
            self._recv()
        line, self._buf = self._buf[:end], self._buf[end + 1:]
        # lazy: json is too heavy for the pause lane, which imports this module
        import json

        msg = json.loads(line)
        if "error" in msg:
            raise QemuError(f"the guest agent refused: {msg['error'].get('desc', msg)}")
        return msg.get("return")

    def call(self, command: str, **args: Any) -> Any:
        try:
            self._sock.sendall(_line({"execute": command, **({"arguments": args} if args
                                                              else {})}))
            return self._reply()
        except (OSError, ValueError) as e:
            raise QemuError(f"the guest agent does not answer {command} ({e})") from e

    def settimeout(self, seconds: float) -> None:
        self._sock.settimeout(seconds)

    def close(self) -> None:
        self._sock.close()


def _line(obj: dict[str, Any]) -> bytes:
    # lazy: json is too heavy for the pause lane, which imports this module
    import json

    return json.dumps(obj).encode() + b"\n"


def listening(mon: Monitor) -> bool:
    """Whether a guest agent has the channel open now (QEMU's chardev frontend-open: the guest
    opened org.qemu.guest_agent.0; it stays open while the guest is paused), asked of QEMU,
    not of the guest: instant. False too for a VM defined without the channel."""
    for chardev in mon.cmd("query-chardev"):
        if chardev.get("label") == "qga0":
            return bool(chardev.get("frontend-open"))
    return False


def ipv4_addresses(interfaces: list[dict[str, Any]]) -> list[str]:
    """The guest's IPv4 addresses from guest-network-get-interfaces, loopback left out."""
    out = []
    for iface in interfaces:
        for a in iface.get("ip-addresses", []):
            if a.get("ip-address-type") == "ipv4" and not a["ip-address"].startswith("127."):
                out.append(str(a["ip-address"]))
    return out


def wait_and_tend(path: str, state_file: Path, seconds: float, settime: bool,
                  then: Callable[[Agent], dict[str, Any]] | None = None) -> dict[str, Any]:
    """The helper's work: wait for the agent, set the clock, do *then* (recorded as "ran"),
    record what the agent says. A guest that answered the handshake but is slow to carry out
    a call (a loaded host, just after a restore) is given the time left, then asked again on
    a new connection (whose handshake skips the late reply), until the deadline; *then* is
    done once (not again on a new connection once it finished); the record is written
    whatever the end."""
    deadline = time.monotonic() + seconds
    state: dict[str, Any] = {"agent": False}
    ran: dict[str, Any] | None = None
    while True:
        try:
            agent = Agent(path, timeout=min(HANDSHAKE_WAIT,
                                            max(0.1, deadline - time.monotonic())))
        except QemuError as e:
            if isinstance(e.__cause__, FileNotFoundError | ConnectionRefusedError):
                return state  # QEMU is gone (its socket with it): nobody left to serve
            if time.monotonic() >= deadline:
                state["checked"] = time.time()
                _write(state_file, state)
                return state
            time.sleep(0.5)
            continue
        state = {"agent": True, "checked": time.time()}
        try:
            agent.settimeout(max(HANDSHAKE_WAIT, deadline - time.monotonic()))
            if settime:
                agent.call("guest-set-time", time=time.time_ns())
                state["clock_set"] = time.time()
            if then is not None:
                ran = ran if ran is not None else then(agent)
                state["ran"] = ran
            try:
                state["ip4"] = ipv4_addresses(agent.call("guest-network-get-interfaces"))
            except QemuError:
                state["ip4"] = []
        except QemuError:
            if time.monotonic() < deadline:
                continue  # asked again, on a new connection
        finally:
            agent.close()
        _write(state_file, state)
        return state


def _write(path: Path, state: dict[str, Any]) -> None:
    # lazy: json is too heavy for the pause lane, which imports this module
    import json

    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, path)


def read_state(path: Path) -> dict[str, Any]:
    # lazy: json is too heavy for the pause lane, which imports this module
    import json

    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def start_helper(sock: str, state_file: str | Path, seconds: float, settime: bool,
                 script: str | None = None) -> None:
    """Run the helper detached: it outlives the command, which does not wait for it. Its own
    session, stdio on /dev/null; it inherits no other descriptor (Python opens them all
    close-on-exec)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(state_file)
    src = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    # A script is run by agent_exec's helper (which imports this module, never the reverse)
    module = "agent" if script is None else "agent_exec"
    argv = [sys.executable, "-I", "-c",
            f"import sys; sys.path.insert(0, {src!r}); from cbsd.qemu.{module} import main; "
            "sys.exit(main(sys.argv[1:]))", sock, os.fspath(state_file), str(seconds)]
    if settime:
        argv.append("settime")
    if script is not None:
        argv += ["run", script]
    if debug.ON:
        debug.log("proc", " ".join(argv) + " &")
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    try:
        os.posix_spawn(sys.executable, argv, os.environ, setsid=True,
                       file_actions=[(os.POSIX_SPAWN_DUP2, null, fd) for fd in (0, 1, 2)])
    finally:
        os.close(null)


def main(args: list[str], then: Callable[[Agent], dict[str, Any]] | None = None) -> int:
    # lazy: only the detached helper; pathlib is too heavy for the pause lane
    from pathlib import Path

    sock, state_file, seconds = args[0], Path(args[1]), float(args[2])
    try:
        wait_and_tend(sock, state_file, seconds, settime="settime" in args[3:], then=then)
    except (OSError, QemuError):
        return 1
    return 0
