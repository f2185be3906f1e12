"""guest-exec and guest-file-* against a scripted agent on a Unix socket: polling until the
command exits, its exit code, a signal, truncation, a deadline; files copied in bounded
chunks, byte for byte, and the handle closed even when the agent refuses."""

from __future__ import annotations

import base64
import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest

from cbsd.errors import QemuError
from cbsd.qemu import agent, agent_exec
from tests.unit.qemu.test_agent import Reader, serve, synced


class FakeGuest:
    """Answers the agent's commands the way qemu-guest-agent does; records each one."""

    def __init__(self, running_polls: int = 2, status: dict[str, Any] | None = None,
                 files: dict[str, bytes] | None = None) -> None:
        self.running_polls = running_polls
        self.status = status or {}
        self.files = files if files is not None else {}
        self.calls: list[dict[str, Any]] = []
        self.open: dict[int, tuple[str, int]] = {}

    def answer(self, req: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(req)
        cmd, args = req["execute"], req.get("arguments", {})
        if cmd == "guest-exec":
            return {"return": {"pid": 77}}
        if cmd == "guest-exec-status":
            if self.running_polls:
                self.running_polls -= 1
                return {"return": {"exited": False}}
            return {"return": {"exited": True, **self.status}}
        if cmd == "guest-file-open":
            if args["mode"] == "r" and args["path"] not in self.files:
                return {"error": {"class": "GenericError", "desc": "failed to open file "
                                  f"'{args['path']}': No such file or directory"}}
            if args["mode"] == "w":
                self.files[args["path"]] = b""
            self.open[1000] = (args["path"], 0)
            return {"return": 1000}
        if cmd == "guest-file-read":
            path, pos = self.open[args["handle"]]
            chunk = self.files[path][pos:pos + args["count"]]
            self.open[args["handle"]] = (path, pos + len(chunk))
            return {"return": {"count": len(chunk), "buf-b64": base64.b64encode(chunk).decode(),
                               "eof": pos + len(chunk) >= len(self.files[path])}}
        if cmd == "guest-file-write":
            path, _ = self.open[args["handle"]]
            data = base64.b64decode(args["buf-b64"])[:300_000]  # a short write: cbsd goes on
            self.files[path] += data
            return {"return": {"count": len(data), "eof": False}}
        if cmd == "guest-file-close":
            del self.open[args["handle"]]
        return {"return": {}}


def connect(tmp_path: Path, guest: FakeGuest) -> agent.Agent:
    sock = tmp_path / "qga.sock"

    def script(conn: socket.socket, io: Reader) -> None:
        synced(conn, io)
        while line := io.file.readline():
            conn.sendall(json.dumps(guest.answer(json.loads(line))).encode() + b"\n")

    serve(sock, script)
    return agent.Agent(str(sock))


def test_run_polls_until_exited_and_decodes_a_large_output(tmp_path: Path) -> None:
    out = os.urandom(5 << 20)  # a multi-MiB reply line
    guest = FakeGuest(running_polls=3, status={
        "exitcode": 3, "out-data": base64.b64encode(out).decode(),
        "err-data": base64.b64encode(b"oops\n").decode()})
    a = connect(tmp_path, guest)
    done = agent_exec.run(a, ["/bin/sh", "-c", "x"], timeout=30)
    a.close()
    assert done == agent_exec.Finished(3, out, b"oops\n", truncated=False)
    assert guest.calls[0] == {"execute": "guest-exec", "arguments": {
        "path": "/bin/sh", "arg": ["-c", "x"], "capture-output": True}}
    assert [c["execute"] for c in guest.calls[1:]] == ["guest-exec-status"] * 4


def test_run_reports_a_signal_and_truncation(tmp_path: Path) -> None:
    guest = FakeGuest(running_polls=0, status={"signal": 9, "out-truncated": True})
    a = connect(tmp_path, guest)
    assert agent_exec.run(a, ["/bin/true"], timeout=30) == agent_exec.Finished(
        128 + 9, b"", b"", truncated=True)
    a.close()


def test_run_gives_up_at_its_deadline(tmp_path: Path) -> None:
    a = connect(tmp_path, FakeGuest(running_polls=10**9))
    with pytest.raises(agent_exec.StillRunning, match="guest pid 77"):
        agent_exec.run(a, ["/bin/sleep", "1000"], timeout=0.2)
    a.close()


def test_files_round_trip_in_chunks(tmp_path: Path) -> None:
    data = os.urandom(2 * agent_exec.CHUNK + 12345)
    guest = FakeGuest()
    a = connect(tmp_path, guest)
    src = iter([data[:agent_exec.CHUNK], data[agent_exec.CHUNK:], b""])
    assert agent_exec.write_file(a, "/tmp/x", lambda n: next(src)) == len(data)
    assert guest.files["/tmp/x"] == data and not guest.open
    got: list[bytes] = []
    assert agent_exec.read_file(a, "/tmp/x", got.append) == len(data)
    a.close()
    assert b"".join(got) == data and not guest.open
    reads = [c for c in guest.calls if c["execute"] == "guest-file-read"]
    assert all(c["arguments"]["count"] == agent_exec.CHUNK for c in reads) and len(reads) == 3


def test_a_missing_guest_file_is_the_agents_one_line(tmp_path: Path) -> None:
    a = connect(tmp_path, FakeGuest())
    with pytest.raises(QemuError, match="No such file or directory"):
        agent_exec.read_file(a, "/none", lambda b: None)
    a.close()
