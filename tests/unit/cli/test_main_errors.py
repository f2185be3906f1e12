"""main() turns every exception into one line on stderr and a documented exit code; a
traceback appears only with CBSD_DEBUG set. Each exception class the code can raise is fed to
it from inside a command handler, as a real fault would arrive."""

from __future__ import annotations

import errno
import sqlite3
from pathlib import Path

import pytest

from cbsd.cli import commands, hosts, main
from cbsd.cli.table import COMMANDS
from cbsd.errors import (
    BusyError,
    Cancelled,
    CheckpointError,
    EnvironmentFault,
    MigrationFailed,
    NoSpaceError,
    NoSuchVM,
    QemuError,
    QmpCommandError,
    StateError,
    UsageError,
    describe,
)

FAULTS: list[tuple[BaseException, int, str]] = [
    (UsageError("bad key"), 2, "bad key"),
    (NoSuchVM("No such VM: x"), 2, "No such VM: x"),
    (StateError("vm1: not running"), 1, "vm1: not running"),
    (BusyError("vm1: busy"), 75, "vm1: busy"),
    (QemuError("vm1: QEMU died"), 1, "vm1: QEMU died"),
    (QmpCommandError("vm1", "stop", "GenericError", "nope"), 1, "vm1: QEMU refused stop: nope"),
    (MigrationFailed("vm1", "failed", "No space left on device"), 1, "No space left"),
    (CheckpointError("vm1: damaged"), 1, "vm1: damaged"),
    (NoSpaceError("vm1: no space"), 1, "vm1: no space"),
    (EnvironmentFault("inventory damaged"), 1, "inventory damaged"),
    (Cancelled("cancelled by SIGTERM"), 1, "cancelled by SIGTERM"),
    (KeyboardInterrupt(), 1, "cancelled"),
    (OSError(errno.ENOSPC, "No space left on device", "/wd/x"), 1, "no space left on device"),
    (OSError(errno.EROFS, "Read-only file system", "/wd/x"), 1,
     "cannot use /wd/x: Read-only file system"),
    (PermissionError(errno.EACCES, "Permission denied", "/wd"), 1,
     "cannot use /wd: Permission denied"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "/wd/y"), 1, "/wd/y"),
    (sqlite3.DatabaseError("file is not a database"), 1, "inventory error: file is not a"),
    (sqlite3.OperationalError("database is locked"), 1, "inventory error: database is locked"),
    (RuntimeError("a bug\nover two lines"), 1, "internal error: RuntimeError: a bug over two"),
    (AssertionError(), 1, "internal error: AssertionError"),
    (ValueError("x"), 1, "internal error: ValueError: x"),
]


@pytest.mark.parametrize(("fault", "code", "text"), FAULTS,
                         ids=[type(f[0]).__name__ + str(i) for i, f in enumerate(FAULTS)])
def test_any_fault_is_one_line(fault: BaseException, code: int, text: str, tmp_path: Path,
                               monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("CBSD_WORKDIR", str(tmp_path / "wd"))
    monkeypatch.delenv("CBSD_DEBUG", raising=False)

    def handler(*_: object) -> int:
        raise fault

    monkeypatch.setattr(hosts, "bls", handler)
    assert main.main(["bls"]) == code
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and text in err, err
    assert "Traceback" not in err


def test_debug_switch_shows_the_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("CBSD_WORKDIR", str(tmp_path / "wd"))
    monkeypatch.setenv("CBSD_DEBUG", "1")

    def handler(*_: object) -> int:
        raise RuntimeError("boom")

    monkeypatch.setattr(hosts, "bls", handler)
    assert main.main(["bls"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().endswith(
        "(run with CBSD_DEBUG=1 for the traceback, and please report it)")


def test_one_vm_of_several_fails_with_any_exception(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """each(): an unexpected exception on one VM is that VM's one line; the others still run,
    and mixed codes aggregate to 1."""
    from cbsd.core.vm.context import Context
    from cbsd.storage.paths import Workdir

    ctx = Context(Workdir(tmp_path / "wd"))
    seen = []

    def fn(_: Context, jname: str) -> str:
        seen.append(jname)
        if jname == "a":
            raise OSError(errno.EIO, "Input/output error", "/wd/vm/a")
        if jname == "b":
            raise BusyError("b: busy")
        return f"{jname}: ok"

    assert commands.each(ctx, ["a", "b", "c"], fn) == 1
    assert seen == ["a", "b", "c"]
    out, err = capsys.readouterr()
    assert out == "c: ok\n"
    assert err.splitlines() == ["cbsd: cannot use /wd/vm/a: Input/output error", "b: busy"]
    assert commands.each(ctx, ["b"], fn) == 75


def test_describe_never_raises_on_odd_exceptions() -> None:
    class Weird(Exception):
        def __str__(self) -> str:
            return ""

    message, code = describe(Weird())
    assert code == 1 and "internal error: Weird" in message


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_a_handler(name: str) -> None:
    assert callable(main.handler(name))
