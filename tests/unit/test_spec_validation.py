"""specs.from_untrusted: a definition from outside (archive, vm.json, inventory row, a
node's answer) is checked field by field with bcreate's rules; storage/paths.Workdir joins only
plain names; qemu/argv escapes every value it places in an option string."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cbsd import specs
from cbsd.errors import UsageError
from cbsd.model import Nic, VMSpec
from cbsd.qemu.argv import RuntimePaths, build_argv
from cbsd.qemu.host import Host
from cbsd.storage.paths import Workdir

GOOD: dict[str, Any] = {
    "jname": "vm1", "ram": 512 << 20, "cpus": 2, "os_type": "linux", "machine": "pc-i440fx-8.2",
    "disks": ["dsk1.qcow2", "dsk2.qcow2"], "iso": "/srv/debian.iso", "kernel": None,
    "initrd": None, "cmdline": None, "vnc": True, "vnc_password": "pw", "vnc_bind": "127.0.0.1",
    "nic": "user", "hostfwd": ["tcp:127.0.0.1:2222:22", "udp:0.0.0.0:5353:53"], "astart": False,
    "guest_agent": True, "virtio_rnd": True, "efi": "none",
    "cloud_init": {"ci_user_add": "u", "instance_id": "0011"}, "mac": "52:54:00:12:34:56",
    "interface": "", "disk_controllers": {"dsk2.qcow2": "nvme"}, "ram_file": "auto",
    "dedup": "off", "genid": "off", "checkpoint_schedule": "@hourly",
    "checkpoint_expiry": "1d12h", "checkpoint_pattern": "auto-%H%M", "checkpoint_live": True,
    "checkpoint_stopped": False,
    "ha": False, "ha_node": "", "ha_interval": "30s",
}


def test_every_field_has_a_rule() -> None:
    assert set(specs.FIELDS) == {f.name for f in dataclasses.fields(VMSpec)}


def test_a_good_definition_round_trips() -> None:
    spec = specs.from_untrusted(GOOD, "x")
    # GOOD has the single-NIC keys of a definition before bhyve-nic: read as one NIC.
    nic = {"nic_type": "user", "nic_hwaddr": "52:54:00:12:34:56", "nic_parent": "",
           "hostfwd": GOOD["hostfwd"]}
    assert spec.to_dict() == {**{k: v for k, v in GOOD.items()
                                 if k not in ("nic", "mac", "interface", "hostfwd")},
                              "nics": [nic]}
    assert specs.from_untrusted(spec.to_dict(), "x") == spec
    # What cbsd writes, it reads back (the inventory, vm.json, an export's header).
    assert specs.from_untrusted(VMSpec(jname="a", ram=1 << 30).to_dict(), "x") == \
        VMSpec(jname="a", ram=1 << 30)


def test_missing_keys_take_the_defaults_of_older_definitions() -> None:
    assert specs.from_untrusted({"jname": "a", "ram": 1 << 30}, "x") == \
        VMSpec(jname="a", ram=1 << 30)


def test_a_legacy_hostfwd_rule_is_stored_as_bcreate_stores_it() -> None:
    spec = specs.from_untrusted({**GOOD, "hostfwd": ["tcp:2222:22"]}, "x")
    assert spec.hostfwd == ["tcp:127.0.0.1:2222:22"]


BAD = [
    # (what changes, the key the one-line error must name)
    ({"ram": "512m"}, "ram"),
    ({"ram": True}, "ram"),
    ({"ram": 1 << 20}, "ram"),
    ({"ram": 1 << 60}, "ram"),
    ({"cpus": 0}, "cpus"),
    ({"cpus": 1000}, "cpus"),
    ({"cpus": 2.0}, "cpus"),
    ({"os_type": "plan9"}, "os_type"),
    ({"jname": "../x"}, "jname"),
    ({"jname": 7}, "jname"),
    ({"machine": "pc,accel=kvm"}, "machine"),
    ({"machine": "type=none"}, "machine"),
    ({"disks": ["../other/dsk1.qcow2"]}, "disks"),
    ({"disks": ["dsk1.qcow2/.."]}, "disks"),
    ({"disks": [".."]}, "disks"),
    ({"disks": ["dsk1.raw"]}, "disks"),
    ({"disks": ["efivars.qcow2"]}, "disks"),
    ({"disks": ["dsk1.qcow2", "dsk1.qcow2"]}, "disks"),
    ({"disks": "dsk1.qcow2"}, "disks"),
    ({"iso": "relative.iso"}, "iso"),
    ({"iso": 3}, "iso"),
    ({"kernel": "/k\0x"}, "kernel"),
    ({"cmdline": ["console=ttyS0"]}, "cmdline"),
    ({"vnc": 1}, "vnc"),
    ({"vnc_bind": "0.0.0.0"}, "vnc_bind"),
    ({"vnc_bind": "192.0.2.1"}, "vnc_bind"),
    ({"vnc_bind": "127.0.0.1,password=off"}, "vnc_bind"),
    ({"nic": "tap"}, "nic"),
    ({"hostfwd": ["tcp:127.0.0.1:2222:22,,guestfwd=tcp:10.0.2.9:1-cmd:sh"]}, "hostfwd"),
    ({"hostfwd": ["tcp::2222-:22"]}, "hostfwd"),
    ({"hostfwd": ["tcp:1.2.3.4:2222:22", "tcp:2222:22"]}, "hostfwd"),
    ({"hostfwd": ["", "tcp:2222:22"]}, "hostfwd"),
    ({"hostfwd": "tcp:2222:22"}, "hostfwd"),
    ({"efi": "bios"}, "efi"),
    ({"cloud_init": {"runcmd": "rm -rf /"}}, "cloud_init"),
    ({"cloud_init": {"ci_user_add": 5}}, "cloud_init.ci_user_add"),
    ({"mac": "01:00:5e:00:00:01"}, "mac"),
    ({"mac": "52:54:00:12:34:56,romfile=/x"}, "mac"),
    ({"nic": "bridge", "hostfwd": [], "interface": "br0,script=/x"}, "interface"),
    ({"disk_controllers": {"dsk2.qcow2": "scsi"}}, "disk_controllers.dsk2.qcow2"),
    ({"disk_controllers": {"../x.qcow2": "nvme"}}, "disk_controllers"),
    ({"disk_controllers": {"dsk9.qcow2": "nvme"}}, "disk_controllers"),
    ({"ram_file": "on"}, "ram_file"),
    ({"dedup": None}, "dedup"),
    ({"surprise": 1}, "surprise"),
    ({"initrd": "/k/initrd"}, "kernel"),
    ({"vnc": False}, "vnc"),
    ({"nic": "none"}, "nic=user"),
    ({"checkpoint_schedule": "now"}, "checkpoint_schedule"),
    ({"checkpoint_schedule": "0 * * * * ; rm"}, "checkpoint_schedule"),
    ({"checkpoint_expiry": "2 days"}, "checkpoint_expiry"),
    ({"checkpoint_expiry": "0h"}, "checkpoint_expiry"),
    ({"checkpoint_pattern": "../x-%H"}, "checkpoint_pattern"),
    ({"checkpoint_pattern": "a-%Z"}, "checkpoint_pattern"),
    ({"checkpoint_pattern": ""}, "checkpoint_pattern"),
    ({"checkpoint_pattern": None}, "checkpoint_pattern"),
    ({"checkpoint_live": 1}, "checkpoint_live"),
]


@pytest.mark.parametrize(("change", "key"), BAD, ids=[str(c) for c, _ in BAD])
def test_a_bad_value_is_refused_naming_its_key(change: dict[str, Any], key: str) -> None:
    with pytest.raises(UsageError) as e:
        specs.from_untrusted({**GOOD, **change}, "the archive's definition")
    message = str(e.value)
    assert message.startswith("the archive's definition: ")
    assert key in message
    assert "\n" not in message


@pytest.mark.parametrize("data", [None, [], "vm1", 3, {"jname": "a"}, {"ram": 1 << 30}])
def test_what_is_no_definition_is_refused(data: Any) -> None:
    with pytest.raises(UsageError, match=r"^x: "):
        specs.from_untrusted(data, "x")


@pytest.mark.parametrize("name", ["", ".", "..", "../vm2", "a/b", "a\0b"])
def test_the_workdir_joins_only_plain_names(tmp_path: Path, name: str) -> None:
    wd = Workdir(tmp_path)
    for join in (lambda: wd.vm_dir(name), lambda: wd.system(name), lambda: wd.lock_file(name),
                 lambda: wd.disk("vm1", name), lambda: wd.checkpoint("vm1", name)):
        with pytest.raises(UsageError, match="not a plain file name"):
            join()
    assert wd.disk("vm1", "dsk1.qcow2") == tmp_path / "vm" / "vm1" / "dsk1.qcow2"


HOST = Host(qemu="/q", qemu_img="/qi", version="8.2.0", accel="tcg", qboot="")
PATHS = RuntimePaths(disks=("/w/d,1.qcow2",), qmp_sock="/w/q", console_sock="/w/c",
                     console_log="/w/l", pidfile="/w/p", qemu_log="/w/ql", taps=("t,x",),
                     ifup="/w/i")


def _options(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def _split(opts: str) -> list[str]:
    """QEMU's own reading of an option string: ',' separates unless doubled."""
    return opts.replace(",,", "\0").split(",")


def test_argv_escapes_every_value_in_an_option_string() -> None:
    # Definitions are checked before QEMU sees them; argv alone must still never let a value
    # add an option: these bypass the check on purpose.
    spec = VMSpec(jname="x,y", ram=1 << 30, machine="pc", disks=["dsk1.qcow2"],
                  nics=[Nic(hostfwd=["tcp:127.0.0.1:22,restrict=on:22"],
                            nic_hwaddr="52:54:00:00:00:01,x=y")])
    argv = build_argv(spec, HOST, PATHS)
    netdev = _split(_options(argv, "-netdev")[0])
    assert netdev[:2] == ["user", "id=net0"] and len(netdev) == 3
    assert netdev[2].startswith("hostfwd=")
    device = _split(_options(argv, "-device")[-1])
    assert [p.split("=")[0] for p in device] == ["virtio-net-pci", "id", "netdev", "mac",
                                                 "romfile"]
    assert len(_split(_options(argv, "-name")[0])) == 2
    bridge = build_argv(dataclasses.replace(spec, nics=[Nic(nic_type="bridge")]), HOST, PATHS)
    assert [p.split("=")[0] for p in _split(_options(bridge, "-netdev")[0])] == \
        ["tap", "id", "ifname", "script", "downscript"]


@pytest.mark.parametrize("change", [{"machine": "pc,accel=kvm"}, {"machine": "type=x"},
                                    {"vnc": True, "vnc_bind": "to=99"},
                                    {"vnc": True, "vnc_bind": "0.0.0.0,password=off"}])
def test_argv_refuses_a_keyless_value_qemu_would_read_as_options(change: dict[str, Any]
                                                                 ) -> None:
    spec = dataclasses.replace(VMSpec(jname="x", ram=1 << 30, disks=["dsk1.qcow2"]), **change)
    with pytest.raises(UsageError, match="not usable on QEMU's command line"):
        build_argv(spec, HOST, PATHS)


def test_a_damaged_inventory_entry_is_reported_in_its_place(tmp_path: Path) -> None:
    import json
    import sqlite3

    from cbsd.errors import EnvironmentFault
    from cbsd.storage.inventory import Inventory

    inv = Inventory(tmp_path / "inv.sqlite")
    for jname in ("a", "b", "c"):
        inv.add(VMSpec(jname=jname, ram=1 << 30))
    db = sqlite3.connect(tmp_path / "inv.sqlite")
    with db:
        db.execute("UPDATE vm SET spec = ? WHERE jname = 'b'",
                   (json.dumps({**VMSpec(jname="b", ram=1 << 30).to_dict(), "ram": "1g"}),))
    db.close()
    entries = inv.all()
    assert [(j, type(s).__name__) for j, s, _, _ in entries] == \
        [("a", "VMSpec"), ("b", "EnvironmentFault"), ("c", "VMSpec")]
    assert "the entry of b is damaged: bad value for ram" in str(entries[1][1])
    with pytest.raises(EnvironmentFault, match="the entry of b is damaged"):
        inv.get("b")
    assert inv.get("c") == VMSpec(jname="c", ram=1 << 30)
    inv.close()


_json_value = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                               max_size=3),
    max_leaves=8)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from([*specs.FIELDS, *specs.LEGACY_NIC, "other"]),
                      _json_value, max_size=6),
       st.booleans())
def test_any_json_is_a_definition_or_one_line_exit_2(change: dict[str, Any], whole: bool
                                                     ) -> None:
    """Whatever an archive, a vm.json or a row holds: a VMSpec that passes the check again
    and builds an argv, or UsageError -- never another exception."""
    data = change if whole else {**GOOD, **change}
    try:
        spec = specs.from_untrusted(data, "x")
    except UsageError as e:
        assert e.exit_code == 2 and "\n" not in e.message and e.message.startswith("x: ")
        return
    assert specs.from_untrusted(spec.to_dict(), "x") == spec
    build_argv(spec, HOST, PATHS)
