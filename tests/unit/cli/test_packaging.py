"""What a Linux admin gets besides the command: a man page from the same registry as
--help, bash completion, the fast launcher for pip users, the host-integration installer."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cbsd.cli import complete, launcher, manpage
from cbsd.cli.args import parse
from cbsd.cli.table import BCREATE_KEYS, BSET_KEYS, COMMANDS
from cbsd.errors import UsageError
from cbsd.model import HA_KEYS
from tests.paths import REPO as ROOT


def test_the_man_page_has_every_command_and_key() -> None:
    page = manpage.render()
    assert page.startswith(".TH CBSD 8")
    for cmd in COMMANDS.values():
        assert f".SS {cmd.name}" in page
        for k in cmd.keys:
            assert f".BR {k.name} =" in page, (cmd.name, k.name)
    assert not any(line.startswith(".") and line[1:2] == " " for line in page.splitlines())


def test_completion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CBSD_WORKDIR", str(tmp_path / "none"))
    assert complete.candidates("bs", []) == ["bschedule", "bscp", "bset", "bsnapshot", "bstart",
                                             "bstop", "bsuspend"]
    assert "checkpoint=" in complete.candidates("ch", ["bstart"])
    assert complete.candidates("mode=d", ["bcheckpoint"]) == ["mode=destroy",
                                                                "mode=destroyall"]
    assert complete.candidates("paused=", ["bstart"]) == ["paused=0", "paused=1"]
    assert complete.candidates("jname=", ["bstart"]) == []  # no VMs, and no error
    assert complete.candidates("x", ["nosuch"]) == []


def test_bset_takes_what_bcreate_sets_without_defaults() -> None:
    names = {k.name for k in BSET_KEYS}
    assert {"vm_ram", "vm_cpus", "nic_hwaddr", "hostfwd", "ci_user_add", "vm_efi"} <= names
    assert not names & {"image", "iso", "imgsize", "runasap"}
    assert all(k.default is None for k in BSET_KEYS)
    # the ha keys are bset's only: a standby is chosen for a VM that exists (in the cluster)
    assert {k.name for k in BCREATE_KEYS} > names - set(HA_KEYS)


@pytest.mark.parametrize(("raw", "ok"), [("52:54:00:AB:cd:01", "52:54:00:ab:cd:01"),
                                          ("52-54-00-00-00-01", "52:54:00:00:00:01"),
                                          ("01:00:5e:00:00:01", None), ("52:54:00:00:00", None),
                                          ("zz:54:00:00:00:01", None)])
def test_mac_addresses(raw: str, ok: str | None) -> None:
    if ok is None:
        with pytest.raises(UsageError, match="a unicast MAC address"):
            parse(COMMANDS["bcreate"], ["jname=x", f"nic_hwaddr={raw}"])
    else:
        assert parse(COMMANDS["bcreate"], ["jname=x", f"nic_hwaddr={raw}"])["nic_hwaddr"] == ok


def test_bget_reads_bare_words_after_the_name_as_settings() -> None:
    a = parse(COMMANDS["bget"], ["vm1", "vm_ram", "vm_cpus"])
    assert a["jname"] == "vm1" and a["extra"] == ["vm_ram", "vm_cpus"]
    a = parse(COMMANDS["bget"], ["jname=vm1", "vm_ram"])
    assert a["jname"] == "vm1" and a["extra"] == ["vm_ram"]


def test_the_launcher_starts_python_isolated(tmp_path: Path) -> None:
    dest = tmp_path / "cbsd"
    launcher.write(str(dest), [str(ROOT / "src")])
    assert dest.read_text().splitlines()[0] == f"#!{sys.executable} -IS"
    assert os.access(dest, os.X_OK)
    out = subprocess.run([str(dest), "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("cbsd ")


def test_host_integration_installs_with_one_command(tmp_path: Path) -> None:
    env = {**os.environ, "DESTDIR": str(tmp_path)}
    subprocess.run(["bash", str(ROOT / "scripts" / "install-host-integration.sh")], env=env,
                   check=True, capture_output=True)
    assert os.access(tmp_path / "usr/local/sbin/cbsd-guests", os.X_OK)
    assert (tmp_path / "etc/systemd/system/cbsd-guests.service").is_file()
    defaults = tmp_path / "etc/default/cbsd-guests"
    defaults.write_text("PARALLEL=2\n")
    subprocess.run(["bash", str(ROOT / "scripts" / "install-host-integration.sh")], env=env,
                   check=True, capture_output=True)
    assert defaults.read_text() == "PARALLEL=2\n", "the admin's defaults are kept"
