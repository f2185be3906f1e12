"""The QMP client against a scripted server on a Unix socket: the protocol's edge cases that a
real QEMU produces only by accident (events between replies, garbage, silence, a hang-up).
The integration tests drive the same client against real QEMU."""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cbsd.errors import MigrationFailed, QemuError, QmpCommandError
from cbsd.qemu import qmp
from cbsd.qemu.qmp import Monitor

GREETING = {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}}, "capabilities": []}}

Script = Callable[[socket.socket, "Lines"], None]


class Lines:
    def __init__(self, conn: socket.socket) -> None:
        self.file = conn.makefile("rb")
        self.conn = conn
        self.fds: list[int] = []

    def request(self) -> dict:  # type: ignore[type-arg]
        return json.loads(self.file.readline())

    def request_with_fd(self) -> dict:  # type: ignore[type-arg]
        msg, fds, _, _ = socket.recv_fds(self.conn, 65536, 1)
        self.fds += fds
        return json.loads(msg)

    def send(self, *objs: object) -> None:
        self.conn.sendall(b"".join(json.dumps(o).encode() + b"\n" for o in objs))


def handshake(conn: socket.socket, io: Lines) -> None:
    io.send(GREETING)
    req = io.request()
    assert req["execute"] == "qmp_capabilities"
    io.send({"return": {}, "id": req["id"]})


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Callable[[Script], Path]]:
    threads: list[threading.Thread] = []

    def start(script: Script) -> Path:
        path = tmp_path / "qmp.sock"
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(path))
        listener.listen(1)

        def serve() -> None:
            conn, _ = listener.accept()
            with conn:
                script(conn, Lines(conn))
            listener.close()

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        threads.append(t)
        return path

    yield start
    for t in threads:
        t.join(5)


def test_replies_are_matched_by_id_and_events_skipped(server) -> None:  # type: ignore[no-untyped-def]
    def script(conn: socket.socket, io: Lines) -> None:
        handshake(conn, io)
        req = io.request()
        assert req == {"execute": "stop", "id": req["id"]}
        io.send({"event": "STOP", "timestamp": {}}, {"return": {}, "id": req["id"]})
        req = io.request()
        assert req["arguments"] == {"device": "disk0", "name": "t"}
        io.send({"return": {"ok": 1}, "id": req["id"]})

    with Monitor(server(script), "vm1") as mon:
        assert mon.cmd("stop") == {}
        assert mon.cmd("blockdev-snapshot-internal-sync", device="disk0", name="t") == {"ok": 1}


def test_an_error_reply_names_the_command_and_keeps_the_session(server) -> None:  # type: ignore[no-untyped-def]
    def script(conn: socket.socket, io: Lines) -> None:
        handshake(conn, io)
        req = io.request()
        io.send({"error": {"class": "GenericError", "desc": "no such tag"}, "id": req["id"]})
        req = io.request()
        io.send({"return": {"status": "running", "running": True}, "id": req["id"]})

    with Monitor(server(script), "vm1") as mon:
        with pytest.raises(QmpCommandError, match=r"^vm1: QEMU refused snap: no such tag$") as e:
            mon.cmd("snap")
        assert (e.value.command, e.value.error_class, e.value.desc) == (
            "snap", "GenericError", "no such tag")
        assert mon.running()


def test_a_failed_migration_carries_qemus_error_desc(server) -> None:  # type: ignore[no-untyped-def]
    def script(conn: socket.socket, io: Lines) -> None:
        handshake(conn, io)
        req = io.request()
        io.send({"return": {"status": "active", "ram": {"total": 2, "remaining": 1}},
                 "id": req["id"]})
        req = io.request()
        io.send({"return": {"status": "failed", "error-desc": "Unable to write to file: "
                            "No space left on device"}, "id": req["id"]})

    with Monitor(server(script), "vm1") as mon, pytest.raises(MigrationFailed) as e:
        mon.wait_migration()
    assert e.value.status == "failed" and e.value.no_space
    assert not MigrationFailed("vm1", "failed", "Input/output error").no_space


def test_debug_logs_traffic_without_passwords(server, monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from cbsd import debug

    def script(conn: socket.socket, io: Lines) -> None:
        handshake(conn, io)
        req = io.request()
        io.send({"return": {}, "id": req["id"]})

    monkeypatch.setattr(debug, "ON", True)
    with Monitor(server(script), "vm1") as mon:
        mon.cmd("set_password", protocol="vnc", password="s3cret")
    err = capsys.readouterr().err
    assert "--> {'execute': 'set_password'" in err and "'password': '***'" in err
    assert "<-- {'return': {}" in err and "s3cret" not in err


@pytest.mark.parametrize(("reply", "message"), [
    (b"", "the connection closed"),
    (b"not json\n", "a reply that is not JSON"),
    (b"[1, 2]\n", "a reply that is not a JSON object"),
    (b'{"id": ID}\n', "a reply to stop without a result"),
])
def test_a_broken_reply_is_a_lost_monitor(server, reply: bytes, message: str) -> None:  # type: ignore[no-untyped-def]
    def script(conn: socket.socket, io: Lines) -> None:
        handshake(conn, io)
        req = io.request()
        conn.sendall(reply.replace(b"ID", str(req["id"]).encode()))

    mon = Monitor(server(script), "vm1")
    with pytest.raises(QemuError, match=f"^vm1: lost QEMU's monitor during stop: {message}"):
        mon.cmd("stop")
    assert mon.closed
    with pytest.raises(QemuError, match="monitor is closed"):
        mon.cmd("cont")


def test_replies_in_pieces_and_together(server) -> None:  # type: ignore[no-untyped-def]
    """The client's own line buffer: a reply cut into single bytes, and a reply arriving in
    the same read as an event and the next reply."""
    def script(conn: socket.socket, io: Lines) -> None:
        handshake(conn, io)
        req = io.request()
        for byte in json.dumps({"return": {"status": "paused"}, "id": req["id"]}).encode() + b"\n":
            conn.sendall(bytes([byte]))
        first = io.request()
        # One write: an event, this reply, and already the reply to the request after it.
        io.send({"event": "STOP"}, {"return": 1, "id": first["id"]},
                {"return": 2, "id": first["id"] + 1})
        io.request()

    with Monitor(server(script), "vm1") as mon:
        assert mon.status() == "paused"
        assert mon.cmd("a") == 1
        assert mon.cmd("b") == 2, "what was read past a reply is kept for the next one"


def test_an_overlong_reply_is_a_lost_monitor(server, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(qmp, "_MAX_LINE", 64 * 1024)

    def script(conn: socket.socket, io: Lines) -> None:
        handshake(conn, io)
        io.request()
        conn.sendall(b"x" * 200_000)

    with pytest.raises(QemuError, match="lost QEMU's monitor during stop: an overlong reply"):
        Monitor(server(script), "vm1").cmd("stop")


def test_silence_is_a_timeout(server) -> None:  # type: ignore[no-untyped-def]
    done = threading.Event()

    def script(conn: socket.socket, io: Lines) -> None:
        handshake(conn, io)
        io.request()
        done.wait(5)

    mon = Monitor(server(script), "vm1", timeout=0.2)
    with pytest.raises(QemuError, match=r"^vm1: QEMU did not answer query-status in time$"):
        mon.status()
    done.set()


def test_no_greeting_is_refused(server) -> None:  # type: ignore[no-untyped-def]
    def script(conn: socket.socket, io: Lines) -> None:
        io.send({"hello": 1})

    with pytest.raises(QemuError, match=r"cannot reach QEMU's monitor .*: no QMP greeting"):
        Monitor(server(script), "vm1")


def test_nothing_listening(tmp_path: Path) -> None:
    with pytest.raises(QemuError, match=r"cannot reach QEMU's monitor .*No such file"):
        Monitor(tmp_path / "none.sock", "vm1")


def test_a_file_travels_with_getfd(server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    got: list[bytes] = []

    def script(conn: socket.socket, io: Lines) -> None:
        handshake(conn, io)
        req = io.request_with_fd()
        assert req["execute"] == "getfd" and req["arguments"] == {"fdname": "f"}
        got.append(os.read(io.fds[0], 100))
        os.close(io.fds[0])
        io.send({"return": {}, "id": req["id"]})

    data = tmp_path / "data"
    data.write_bytes(b"through SCM_RIGHTS")
    fd = os.open(data, os.O_RDONLY)
    try:
        with Monitor(server(script), "vm1") as mon:
            mon.send_fd(fd, "f")
    finally:
        os.close(fd)
    assert got == [b"through SCM_RIGHTS"]


# The client decodes with json's own C scanner and encodes bare commands by hand (import cost,
# see the module docstring): both must agree with the json module on everything.
def _containers(inner: st.SearchStrategy[object]) -> st.SearchStrategy[object]:
    return st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4)


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    _containers,
    max_leaves=20,
)


@given(value=_json_values, pad=st.sampled_from(["", " ", "\t", "  \r"]))
def test_replies_decode_as_json_loads_does(value: object, pad: str) -> None:
    line = (pad + json.dumps(value, ensure_ascii=False) + pad).encode()
    assert qmp._loads(line) == json.loads(line)


@pytest.mark.parametrize("line", [b"", b"   ", b"{", b'{"a": 1} x', b"{'a': 1}", b"\xff",
                                  b'{"a": "\x01"}', b"[1,]"])
def test_what_json_loads_rejects_is_rejected(line: bytes) -> None:
    with pytest.raises(ValueError):
        json.loads(line)
    with pytest.raises(ValueError):
        qmp._loads(line)


@pytest.mark.parametrize("request_", [
    {"execute": "stop", "id": 1},
    {"execute": "query-status", "id": 12345},
    {"execute": "migrate", "id": 3, "arguments": {"uri": "fd:x\"y", "n": [1, 2.5, None]}},
])
def test_requests_encode_as_json(request_: dict[str, object]) -> None:
    data = qmp._encode(request_)
    assert data.endswith(b"\n") and data.count(b"\n") == 1
    assert json.loads(data) == request_
