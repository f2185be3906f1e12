"""Several NICs per VM, without QEMU: the command line of 2 and 3 NICs (golden files), the
definition before bhyve-nic read as one NIC, the checks of every NIC's keys, the saved device
set a checkpoint is compared with, and the script that puts each tap on its bridge.

Regenerate the golden files after an intended change with:
UPDATE_GOLDEN=1 pytest tests/unit/test_nics.py
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from cbsd import specs
from cbsd.core.checkpoint.load import incompatibility
from cbsd.errors import UsageError
from cbsd.model import Nic, VMSpec
from cbsd.qemu.argv import build_argv
from cbsd.qemu.network import tap_name, write_ifup
from cbsd.storage.manifest import Manifest
from tests.paths import GOLDEN
from tests.unit.qemu.test_argv import HOST, PATHS

BASE = dict(jname="x", ram=512 << 20, machine="pc-i440fx-7.2", disks=["dsk1.qcow2"])
CASES: dict[str, tuple[VMSpec, tuple[str, ...]]] = {
    "nics-bridge-user": (
        VMSpec(**BASE, nics=[Nic("bridge", "52:54:00:00:00:01"),  # type: ignore[arg-type]
                             Nic("user", "52:54:00:00:00:02", hostfwd=["tcp:127.0.0.1:2222:22"])]),
        ("cbsdt0000000000", "")),
    "nics-three": (
        VMSpec(**BASE, os_type="windows",  # type: ignore[arg-type]
               nics=[Nic("user", "52:54:00:00:00:01"), Nic("bridge", "52:54:00:00:00:02"),
                     Nic("bridge", "52:54:00:00:00:03", nic_parent="br0")]),
        ("", "cbsdt1111111111", "cbsdt2222222222")),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_argv_of_several_nics_matches_golden(case: str) -> None:
    spec, taps = CASES[case]
    paths = dataclasses.replace(PATHS, taps=taps, ifup="/w/js/x/ifup")
    text = "\n".join(build_argv(spec, HOST, paths)) + "\n"
    golden = GOLDEN / f"{case}.argv"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text()


def test_one_nic_gives_the_command_line_it_always_had() -> None:
    """What an old definition reads as builds the argv of before (golden: bridge.argv)."""
    old = {**BASE, "nic": "bridge", "mac": "52:54:00:ab:cd:ef", "interface": ""}
    spec = specs.from_untrusted(old, "x")
    paths = dataclasses.replace(PATHS, taps=("cbsdt0123456789",), ifup="/w/js/x/ifup")
    assert "\n".join(build_argv(spec, HOST, paths)) + "\n" == \
        (GOLDEN / "bridge.argv").read_text()


@pytest.mark.parametrize(("old", "nics"), [
    ({}, [Nic("user")]),  # no network keys at all: QEMU's user NIC, as the first cbsd gave
    ({"nic": "user", "mac": "52:54:00:00:00:01", "hostfwd": ["tcp:2222:22"]},
     [Nic("user", "52:54:00:00:00:01", hostfwd=["tcp:127.0.0.1:2222:22"])]),
    ({"nic": "bridge", "mac": "52:54:00:00:00:01", "interface": "br0", "hostfwd": []},
     [Nic("bridge", "52:54:00:00:00:01", nic_parent="br0")]),
    ({"nic": "none", "mac": "52:54:00:00:00:01", "interface": "", "hostfwd": []}, []),
], ids=["no keys", "user", "bridge", "none"])
def test_a_definition_before_several_nics_is_read_as_one(old: dict[str, Any],
                                                         nics: list[Nic]) -> None:
    spec = specs.from_untrusted({**BASE, **old}, "x")
    assert spec.nics == nics
    stored = spec.to_dict()
    assert "nic" not in stored and "mac" not in stored
    assert specs.from_untrusted(stored, "x") == spec, "the new form reads back the same"


def test_old_and_new_single_nic_states_compare_equal() -> None:
    """A state saved by a cbsd before bhyve-nic ("nic": "user") matches the VM read from
    its old definition; a second NIC makes it another device set."""
    one = specs.from_untrusted({**BASE, "nic": "user"}, "x")
    assert one.restore_relevant()["nic"] == "user"
    assert VMSpec(**BASE, nics=[]).restore_relevant()["nic"] == "none"  # type: ignore[arg-type]
    two, _ = CASES["nics-bridge-user"]
    assert two.restore_relevant()["nic"] == "bridge,user"
    m = Manifest(kind="checkpoint", name="c1", jname="x", created="", created_ts=0.0,
                 qemu_version="7.2.0", accel="tcg", machine="pc-i440fx-7.2", spec={},
                 restore_relevant=two.restore_relevant(), argv=[], was_running=True,
                 live=False, disk_snapshots=[], files={})
    assert incompatibility(m, two.restore_relevant(), "tcg", "7.2.0", lambda _: True) is None
    why = incompatibility(m, one.restore_relevant(), "tcg", "7.2.0", lambda _: True)
    assert why is not None and "its NICs were bridge,user (nic_type in order), now user" in why
    # Another bridge, another MAC: the same devices, the state loads.
    same = dataclasses.replace(two, nics=[Nic("bridge", "52:54:00:00:00:09", "br9"),
                                          Nic("user")])
    assert incompatibility(m, same.restore_relevant(), "tcg", "7.2.0", lambda _: True) is None


NIC_OK = {"nic_type": "bridge", "nic_hwaddr": "52:54:00:00:00:01", "nic_parent": "",
          "hostfwd": []}
BAD_NICS: list[tuple[Any, str]] = [
    ("user", "bad value for nics"),
    ([NIC_OK] * 9, "at most 8 NICs"),
    ([{**NIC_OK, "nic_type": "none"}], "nics[1].nic_type"),
    ([{**NIC_OK, "nic_type": "tap"}], "nics[1].nic_type"),
    ([{**NIC_OK, "nic_hwaddr": "01:00:5e:00:00:01"}], "nics[1].nic_hwaddr"),
    ([{**NIC_OK, "nic_hwaddr": "52:54:00:00:00:01,romfile=/x"}], "nics[1].nic_hwaddr"),
    ([{**NIC_OK, "nic_parent": "br0,script=/x"}], "nics[1].nic_parent"),
    ([NIC_OK, {**NIC_OK, "nic_id": 2}], "nics[2]"),
    ([NIC_OK, "bridge"], "nics[2]"),
    ([NIC_OK, {**NIC_OK, "hostfwd": ["tcp:127.0.0.1:1:2,restrict=on"]}], "nics[2].hostfwd"),
    ([NIC_OK, NIC_OK], "52:54:00:00:00:01 is the MAC of two NICs"),
    ([NIC_OK, {**NIC_OK, "nic_hwaddr": "", "hostfwd": ["tcp:127.0.0.1:2:3"]}],
     "NIC 2: hostfwd= needs nic_type=user"),
    ([{**NIC_OK, "nic_type": "user", "nic_parent": "br0"}], "interface= needs nic=bridge"),
    ([NIC_OK, {**NIC_OK, "nic_type": "user", "nic_hwaddr": "", "nic_parent": "br0"}],
     "NIC 2: nic_parent= needs nic_type=bridge"),
    ([{**NIC_OK, "nic_type": "user", "hostfwd": ["tcp:127.0.0.1:2222:22"]},
      {**NIC_OK, "nic_type": "user", "nic_hwaddr": "", "hostfwd": ["tcp:127.0.0.1:2222:80"]}],
     "forwarded twice"),
]


@pytest.mark.parametrize(("nics", "why"), BAD_NICS, ids=[w for _, w in BAD_NICS])
def test_every_nic_is_checked(nics: Any, why: str) -> None:
    with pytest.raises(UsageError) as e:
        specs.from_untrusted({**BASE, "nics": nics}, "vm.json")
    assert e.value.message.startswith("vm.json: ") and why in e.value.message


def test_old_keys_beside_a_list_are_refused() -> None:
    with pytest.raises(UsageError, match="both nics and mac"):
        specs.from_untrusted({**BASE, "nics": [NIC_OK], "mac": "52:54:00:00:00:02"}, "x")


def test_bset_keys_set_the_first_nic() -> None:
    two, _ = CASES["nics-bridge-user"]
    nics = specs.with_first_nic(two.nics, fresh_mac="52:54:00:00:00:09", interface="br1")
    assert nics == [Nic("bridge", "52:54:00:00:00:01", "br1"), two.nics[1]]
    assert specs.with_first_nic([], fresh_mac="52:54:00:00:00:09", nic="user") == \
        [Nic("user", "52:54:00:00:00:09")]
    assert specs.with_first_nic([Nic("user")], fresh_mac="", nic="none") == []
    with pytest.raises(UsageError, match="the VM has 2 NICs"):
        specs.with_first_nic(two.nics, fresh_mac="", nic="none")


def test_each_tap_goes_on_its_own_bridge(tmp_path: Path) -> None:
    taps = [tap_name(Path("/w"), "x", i) for i in range(3)]
    assert taps[0] == tap_name(Path("/w"), "x"), "NIC 1's tap is the one a VM always had"
    assert len(set(taps)) == 3 and all(len(t) <= 15 for t in taps)
    script = tmp_path / "ifup"
    write_ifup(script, {taps[0]: "cbsd0", taps[2]: "br0"})
    stub = tmp_path / "ip"  # records what the script asks of `ip`
    stub.write_text('#!/bin/sh\necho "$@"\n')
    stub.chmod(0o700)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin"}
    for tap, bridge in ((taps[0], "cbsd0"), (taps[2], "br0")):
        out = subprocess.run([str(script), tap], capture_output=True, text=True, env=env)
        assert out.returncode == 0 and out.stdout.split() == \
            ["link", "set", tap, "master", bridge, "up"]
    assert subprocess.run([str(script), taps[1]], env=env).returncode == 1, "not a NIC's tap"
    with pytest.raises(UsageError):
        write_ifup(script, {taps[0]: "br0; reboot"})
