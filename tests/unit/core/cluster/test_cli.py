"""bcluster's bad input: one line, exit 2, nothing made (no etcd is needed to refuse it)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from cbsd.cli.main import main
from cbsd.core.cluster import admin, config
from cbsd.core.cluster import watchdog as wdog
from cbsd.core.cluster.config import Config
from cbsd.core.vm.context import Context
from cbsd.errors import StateError
from tests.unit.core.conftest import define


@pytest.mark.parametrize(("args", "line"), [
    (["mode=init", "address=10.0.0.1"], "bcluster: mode=init needs name="),
    (["mode=init", "name=n1"], "bcluster: mode=init needs address="),
    (["mode=init", "name=n1", "address=0.0.0.0"], "never listens on a wildcard"),
    (["mode=join", "name=n2", "address=10.0.0.2"], "bcluster: mode=join needs bundle="),
    (["mode=status", "name=n1"], "bcluster: name= is not used with mode=status"),
    (["mode=join", "name=n2", "address=10.0.0.2", "bundle=/nonexistent"], "not a bundle"),
    (["mode=bogus"], "mode"),
    (["mode=init", "name=n1", "address=10.0.0.1", "watchdog=/nonexistent/wd"],
     "bcluster: watchdog=/nonexistent/wd: no such device"),
    (["mode=status", "watchdog=/dev/null"], "bcluster: watchdog= is not used with mode=status"),
    # the keeper writes to the device as root: a disk or a file given by mistake never passes
    (["mode=init", "name=n1", "address=10.0.0.1", "watchdog=/etc/passwd"],
     "bcluster: watchdog=/etc/passwd: not a character device"),
    (["mode=init", "name=n1", "address=10.0.0.1", "watchdog=/"],
     "bcluster: watchdog=/: not a character device"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str], args: list[str],
                                          line: str) -> None:
    monkeypatch.setenv("CBSD_WORKDIR", str(tmp_path / "wd"))
    assert main(["bcluster", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and line in err, err
    assert not (tmp_path / "wd" / "cluster").exists()


def test_status_on_a_host_that_is_no_node_says_so(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("CBSD_WORKDIR", str(tmp_path / "wd"))
    assert main(["bcluster", "mode=status"]) == 1
    assert "not a cluster node" in capsys.readouterr().err


def test_a_keeper_that_cannot_open_its_watchdog_is_never_reported_started(
        ctx: Context, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the device unfit when the keeper opens it (here: a regular file without the test-only
    # switch; busy or denied end the same way): bcluster waits for the keeper and says why
    monkeypatch.delenv(wdog.TEST_ENV, raising=False)
    device = tmp_path / "wd-file"
    device.write_bytes(b"")
    config.folder(ctx.workdir).mkdir(parents=True, exist_ok=True)
    config.save(ctx.workdir, Config("n1", "10.0.0.1", ["https://10.0.0.1:2379"], False,
                                    watchdog=str(device)))
    with pytest.raises(StateError, match=r"the keeper did not start: watchdog=.*not a "
                                         r"character device"):
        admin.start_keeper(ctx)
    assert admin.member._pid(config.keeper_pid(ctx.workdir)) is None
    assert device.read_bytes() == b""


def test_leave_is_refused_while_a_vm_here_is_ha(
        ctx: Context, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    # leaving stops the keeper and deletes alive/NODE: the standby would take the VM over
    # while it runs here, unfenced
    spec = define(ctx, "vmh")
    ctx.inventory.update_spec(replace(spec, ha=True, ha_node="n2"))
    define(ctx, "plain")
    config.folder(ctx.workdir).mkdir(parents=True, exist_ok=True)
    config.save(ctx.workdir, Config("n1", "10.0.0.1", ["https://10.0.0.1:2379"], False))
    monkeypatch.setenv("CBSD_WORKDIR", str(ctx.workdir.root))
    assert main(["bcluster", "mode=leave"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "vmh: ha=1 here: turn ha off first" in err, err
    assert config.configured(ctx.workdir)
