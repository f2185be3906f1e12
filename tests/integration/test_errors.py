"""Bad input through the real CLI, table-driven: one line on stderr naming the problem, the
contract's exit code, and nothing created or changed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.harness import Cbsd

pytestmark = pytest.mark.vm

CASES = [
    # (argv, exit code, stderr fragment)
    (["bcreate", "jname=vm1", "bogus=1"], 2, "unknown key 'bogus'"),
    (["bcreate", "jname=../etc"], 2, "bad jname '../etc'"),
    (["bcreate", "jname=/abs"], 2, "bad jname '/abs'"),
    (["bcreate", "jname=new", "vm_ram=8m"], 2, "under 16 MiB"),
    (["bcreate", "jname=new", "vm_ram=12q"], 2, "not a size"),
    (["bcreate", "jname=new", "image=/nonexistent.img"], 2, "image: no such file"),
    (["bcreate", "jname=new", "initrd=/etc/hostname"], 2, "need kernel="),
    (["bcreate", "jname=new", "vnc_password=x"], 2, "needs vnc=1"),
    (["bcreate", "jname=new", "nic=none", "hostfwd=tcp:2222:22"], 2, "needs nic=user"),
    (["bcreate", "jname=vm1"], 1, "VM already exist: vm1"),
    (["bstart", "jname=ghost"], 2, "No such VM: ghost"),
    (["bstart", "jname=vm1", "checkpoint=nope"], 1, "no checkpoint nope"),
    (["bstart", "jname=vm1", "checkpoint=../vm1"], 2, "bad checkpoint"),
    (["bstop", "jname=vm1"], 1, "not running"),
    (["bcheckpoint", "jname=vm1", "mode=create"], 1, "is Off"),
    (["bcheckpoint", "jname=vm1", "mode=destroy"], 2, "needs name="),
    (["bcheckpoint", "jname=vm1", "mode=list", "live=1"], 2, "live= is not used with mode=list"),
    (["bsuspend", "jname=vm1"], 1, "is Off"),
    (["bsuspend", "jname=vm1", "mode=discard"], 1, "is Off"),
    (["bsuspend", "jname=vm1", "mode=discard", "running_only=1"], 2,
     "running_only= is not used with mode=discard"),
    (["bogus"], 2, "unknown command 'bogus'"),
    (["bls", "jname=zz*"], 2, "No VM matches the mask: zz*"),
]


def _snapshot(wd: Path) -> set[str]:
    return {str(p.relative_to(wd)) for p in wd.rglob("*")
            if "var/lock" not in str(p) and not p.name.startswith("local.sqlite")}


@pytest.mark.parametrize(("argv", "code", "fragment"), CASES,
                         ids=[" ".join(a)[:40] for a, _, _ in CASES])
def test_bad_input(cbsd: Cbsd, counter_vm: str, argv: list[str], code: int,
                   fragment: str) -> None:
    before = _snapshot(cbsd.workdir)
    inventory = cbsd.bls()
    r = cbsd(*argv)
    assert r.code == code, r
    assert fragment in r.err
    assert r.err.count("\n") == 1, f"one line expected: {r.err!r}"
    assert "Traceback" not in r.err
    assert r.out == ""
    assert _snapshot(cbsd.workdir) == before, "nothing may be created or changed"
    assert cbsd.bls() == inventory


def test_help_for_every_command(cbsd: Cbsd) -> None:
    for cmd in ("bcreate", "bstart", "bstop", "bls", "bremove", "blogin", "bcheckpoint",
                "bsuspend", "bpause"):
        r = cbsd(cmd, "--help").ok()
        assert r.out.startswith(f"usage: cbsd {cmd}") and "example:" in r.out
    assert cbsd("--version").ok().out.startswith("cbsd ")
    r = cbsd()
    assert r.code == 2 and "usage: cbsd" in r.err


def test_workdir_and_files_are_owner_only(cbsd: Cbsd, running_counter: str) -> None:
    cbsd("bcheckpoint", "mode=create", "jname=vm1").ok()
    wd = cbsd.workdir
    assert os.stat(wd).st_mode & 0o777 == 0o700
    for p in [wd / "var/db/local.sqlite", cbsd.system("vm1"), cbsd.system("vm1") / "qmp.sock",
              cbsd.system("vm1") / "console.sock", cbsd.system("vm1") / "console.log",
              cbsd.system("vm1") / "checkpoints/checkpoint.ckp",
              cbsd.system("vm1") / "checkpoints/checkpoint.ckp/memory",
              cbsd.system("vm1") / "checkpoints/checkpoint.ckp/manifest.json"]:
        assert os.stat(p).st_mode & 0o077 == 0, f"{p} is readable by others"
