"""The service's pure parts: per-operation cancel, the error -> HTTP status map, the API's use
of the CLI's key tables, tokens, image pools, and the systemd unit."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cbsd import cancel
from cbsd.cli.serve import api_keys
from cbsd.errors import BusyError, Cancelled, CbsdError, NoSuchVM, StateError, UsageError
from cbsd.service import auth, pools
from cbsd.service.app import status_of
from cbsd.service.operations import Operation, Operations
from cbsd.storage.paths import Workdir

ROOT = Path(__file__).resolve().parents[3]


def test_cancel_reaches_only_its_own_operation(tmp_path: Path) -> None:
    """Two operations wait in cancel.check(): cancelling one ends it, the other goes on."""
    started = threading.Barrier(3)
    release = threading.Event()

    def work(ctx: object, progress: object) -> str:
        started.wait(10)
        while not release.is_set():
            cancel.check()
            release.wait(0.01)
        return "done"

    ops = Operations(Workdir(tmp_path / "wd"), lambda op: None)
    a = ops.start("a", ["vm1"], work)  # type: ignore[arg-type]
    b = ops.start("b", ["vm2"], work)  # type: ignore[arg-type]
    started.wait(10)
    ops.cancel(a)
    assert a.finished.wait(10)
    assert (a.status, a.err) == ("Cancelled", "cancelled through the API")
    assert not b.finished.is_set()
    release.set()
    assert b.finished.wait(10) and (b.status, b.result) == ("Success", "done")
    cancel.check()  # this thread has no token, and no process-wide request


def test_a_vm_an_operation_changes_is_busy(tmp_path: Path) -> None:
    gate = threading.Event()
    ops = Operations(Workdir(tmp_path / "wd"), lambda op: None)
    first = ops.start("stop vm1", ["vm1"], lambda c, p: gate.wait(10))
    with pytest.raises(BusyError, match="vm1: busy"):
        ops.start("pause vm1", ["vm1"], lambda c, p: None)
    gate.set()
    assert first.finished.wait(10)
    assert ops.start("pause vm1", ["vm1"], lambda c, p: None).finished.wait(10)


@pytest.mark.parametrize(("error", "status"), [
    (NoSuchVM("No such VM: x"), 404), (UsageError("bad"), 400), (BusyError("busy"), 409),
    (StateError("x: not running"), 500), (Cancelled("c"), 500), (CbsdError("f"), 500),
    (pools.Forbidden("outside"), 403), (RuntimeError("bug"), 500)])
def test_http_status_follows_the_cli_exit_code(error: Exception, status: int) -> None:
    assert status_of(error) == status


def test_api_bodies_go_through_the_cli_key_tables() -> None:
    a = api_keys("bcreate", {"jname": "vm1", "vm_ram": "1g", "vnc": True, "vm_cpus": 2,
                             "hostfwd": ["tcp:2222:22"], "iso": None})
    assert (a["vm_ram"], a["vnc"], a["vm_cpus"], a["iso"]) == (1 << 30, True, 2, None)
    with pytest.raises(UsageError, match="bcreate: unknown key 'vm_rma'"):
        api_keys("bcreate", {"jname": "vm1", "vm_rma": "1g"})
    with pytest.raises(UsageError, match="vm_cpus"):
        api_keys("bset", {"jname": "vm1", "vm_cpus": 0})
    with pytest.raises(UsageError, match="bad value for vnc"):
        api_keys("bcreate", {"jname": "vm1", "vnc": {"x": 1}})


def test_tokens_are_kept_hashed_and_owner_only(tmp_path: Path) -> None:
    wd = Workdir(tmp_path)
    token = auth.add_token(wd, "ci")
    stored = (tmp_path / "service" / "tokens.json")
    assert token not in stored.read_text()
    assert stored.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "service").stat().st_mode & 0o777 == 0o700
    assert auth.token_owner(wd, f"Bearer {token}") == "ci"
    assert auth.token_owner(wd, f"Bearer {token}x") is None
    assert auth.token_owner(wd, token) is None  # not a bearer header
    with pytest.raises(UsageError, match="a token named ci exists"):
        auth.add_token(wd, "ci")
    assert [t["name"] for t in auth.list_tokens(wd)] == ["ci"]
    auth.remove_token(wd, "ci")
    assert auth.token_owner(wd, f"Bearer {token}") is None
    with pytest.raises(UsageError, match="no token named ci"):
        auth.remove_token(wd, "ci")


def test_pool_paths(tmp_path: Path) -> None:
    pool = tmp_path / "pool"
    (pool / "sub").mkdir(parents=True)
    (pool / "a.iso").write_bytes(b"x")
    (pool / "out").symlink_to("/etc")
    (pool / "in").symlink_to(pool / "a.iso")
    wd = Workdir(tmp_path / "wd")
    (wd.root / "vm" / "x").mkdir(parents=True)
    (wd.root / "vm" / "x" / "dsk1.qcow2").write_bytes(b"x")
    ps = pools.parse_pools(f"{pool}, {wd.root}")  # even the workdir as a pool
    assert pools.resolve(ps, wd, "iso", str(pool / "a.iso")) == str(pool / "a.iso")
    assert pools.resolve(ps, wd, "iso", str(pool / "in")) == str(pool / "a.iso")
    for bad, error in ((str(pool / "out" / "shadow"), pools.Forbidden),
                       ("/etc/passwd", pools.Forbidden),
                       (str(wd.root / "vm" / "x" / "dsk1.qcow2"), pools.Forbidden),
                       (f"{pool}/sub/../a.iso", UsageError), ("a.iso", UsageError),
                       (str(pool / "sub"), UsageError)):
        with pytest.raises(error):
            pools.resolve(ps, wd, "iso", bad)
    with pytest.raises(UsageError, match="serve: pools: /nonexistent is not a folder"):
        pools.parse_pools("/nonexistent")


def test_the_unit_never_stops_vms_and_is_installed(tmp_path: Path) -> None:
    unit = (ROOT / "contrib" / "systemd" / "cbsd-serve.service").read_text()
    assert "KillMode=process" in unit.splitlines()
    assert "ExecStart=/usr/local/bin/cbsd serve $SERVE_ARGS" in unit
    env = {**os.environ, "DESTDIR": str(tmp_path)}
    subprocess.run(["bash", str(ROOT / "scripts" / "install-host-integration.sh")], env=env,
                   check=True, capture_output=True)
    assert (tmp_path / "etc/systemd/system/cbsd-serve.service").read_text() == unit
    assert (tmp_path / "etc/default/cbsd-serve").is_file()


@pytest.mark.parametrize("argv", [["bls"], ["token", "mode=list"], ["serve", "--help"]])
def test_the_cli_never_loads_the_web_stack(tmp_path: Path, argv: list[str]) -> None:
    """Only `cbsd serve` itself imports FastAPI, uvicorn and pydantic."""
    code = ("import sys; from cbsd.cli.main import main; main(sys.argv[1:]); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('fastapi', 'uvicorn', 'pydantic', 'starlette', 'httpx')))")
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                         env={**os.environ, "CBSD_WORKDIR": str(tmp_path)}, check=True)
    assert out.stdout.splitlines()[-1] == "[]", out.stdout


def test_sessions_expire_and_origins_must_match() -> None:
    from cbsd.service.sessions import Sessions, origin_ok

    live = Sessions(lifetime=3600)
    sid, s = live.new("ci")
    assert live.get(sid) is s and live.get("other") is None and live.get(None) is None
    live.end(sid)
    assert live.get(sid) is None
    expired = Sessions(lifetime=0)
    sid, _ = expired.new("ci")
    assert expired.get(sid) is None
    assert origin_ok({"origin": "https://h:8443", "host": "h:8443"}, tls=True)
    assert not origin_ok({"origin": "https://evil", "host": "h:8443"}, tls=True)
    assert not origin_ok({"origin": "http://h:8443", "host": "h:8443"}, tls=True)
    assert not origin_ok({"host": "h:8443"}, tls=True)


def test_a_session_ends_unused_and_with_its_token(tmp_path: Path) -> None:
    from cbsd.service.sessions import Sessions

    idle = Sessions(lifetime=3600, idle=0)  # unused for longer than no time at all
    sid, _ = idle.new("ci")
    assert idle.get(sid) is None
    wd = Workdir(tmp_path / "wd")
    auth.add_token(wd, "ci")
    live = Sessions(lifetime=3600, token_exists=lambda owner: auth.token_exists(wd, owner))
    sid, s = live.new("ci")
    assert live.get(sid) is s
    auth.remove_token(wd, "ci")
    assert live.get(sid) is None, "a removed token's sessions end at once"


def test_a_login_from_another_origin_is_refused(tmp_path: Path) -> None:
    """Login CSRF: a page of another site may not log the browser into a session."""
    from fastapi.testclient import TestClient

    from cbsd.service.app import Config, create_app

    wd = Workdir(tmp_path / "wd")
    token = auth.add_token(wd, "ci")
    with TestClient(create_app(Config(wd, api_keys)), base_url="http://cbsd") as c:
        r = c.post("/1.0/login", json={"token": token}, headers={"Origin": "http://evil"})
        assert r.status_code == 403 and "another origin" in r.json()["error"]
        assert "cbsd_session" not in r.cookies
        r = c.post("/1.0/login", json={"token": token}, headers={"Origin": "http://cbsd"})
        assert r.status_code == 200 and "cbsd_session" in r.cookies
        c.cookies.clear()
        assert c.post("/1.0/login", json={"token": token}).status_code == 200  # no browser


def test_an_operation_that_ends_at_once_is_published_started_then_ended(tmp_path: Path) -> None:
    """Its start is published before its end, however soon it fails: here the publisher,
    when called by the caller's thread, lets the operation's own thread finish first (as a
    loaded host may) -- before the fix the start was then published with the end's status,
    and the metrics never counted it as started."""
    seen: list[str] = []

    def notify(op: Operation) -> None:
        if threading.current_thread() is threading.main_thread():
            op.finished.wait(0.5)  # the operation's thread, if it runs already, ends first
        seen.append(op.status)

    def fail(ctx: object, progress: object) -> None:
        raise StateError("vm1: is Off: cannot pause it")

    op = Operations(Workdir(tmp_path / "wd"), notify).start("pause vm1", ["vm1"], fail)
    assert op.finished.wait(10)
    deadline = time.monotonic() + 10
    while len(seen) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert seen == ["Running", "Failure"]
