"""The vmgenid device on QEMU's command line, and which generation ID a load gives the guest
(core/checkpoint/generation.py). The guest's side is tests/integration/test_vmgenid.py."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from cbsd import specs
from cbsd.core.checkpoint import generation
from cbsd.core.checkpoint.load import incompatibility
from cbsd.errors import UsageError
from cbsd.model import GENID_KEY, VMSpec, settings_part
from cbsd.qemu.argv import build_argv
from cbsd.storage.manifest import FileEntry, Manifest
from tests.unit.qemu.test_argv import HOST, PATHS

SPEC = VMSpec(jname="x", ram=512 << 20, machine="pc-i440fx-7.2", disks=["dsk1.qcow2"],
              kernel="/k/vmlinuz")
GUID = "0f90911a-f2f3-4f98-81a0-5cb289729126"


def _devices(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == "-device"]


def _genid(argv: list[str]) -> list[str]:
    return [d for d in _devices(argv) if d.startswith("vmgenid,")]


def test_a_boot_has_the_device_with_a_new_id_unless_vm_genid_is_off() -> None:
    assert _genid(build_argv(SPEC, HOST, PATHS)) == ["vmgenid,id=vmgenid0,guid=auto"]
    assert _genid(build_argv(dataclasses.replace(SPEC, genid="off"), HOST, PATHS)) == []


def test_a_load_has_the_device_exactly_as_the_state_decides() -> None:
    off = dataclasses.replace(SPEC, genid="off")
    assert _genid(build_argv(off, HOST, PATHS, incoming=True, generation=GUID)) == \
        [f"vmgenid,id=vmgenid0,guid={GUID}"]
    assert _genid(build_argv(SPEC, HOST, PATHS, incoming=True, generation=None)) == []


def test_qboot_only_without_the_device() -> None:
    """qboot hangs on the ACPI linker's write-pointer command the device needs."""
    with_id = build_argv(SPEC, HOST, PATHS)
    without = build_argv(SPEC, HOST, PATHS, generation=None)
    assert "-bios" not in with_id
    assert without[without.index("-bios") + 1] == HOST.qboot


def test_vm_genid_takes_auto_or_off() -> None:
    assert specs.from_untrusted({"jname": "a", "ram": 1 << 30, "genid": "off"}, "x").genid \
        == "off"
    assert specs.from_untrusted({"jname": "a", "ram": 1 << 30}, "x").genid == "auto"
    with pytest.raises(UsageError, match="genid"):
        specs.from_untrusted({"jname": "a", "ram": 1 << 30, "genid": "on"}, "x")


def _manifest(kind: str = "checkpoint", device: bool = True) -> Manifest:
    relevant = {**SPEC.restore_relevant(), **({GENID_KEY: True} if device else {})}
    return Manifest(kind=kind, name="c", jname="x", created="2026-12-01T00:00:00.000Z",
                    created_ts=1.5, qemu_version="7.2.22", accel="tcg", machine=SPEC.machine,
                    spec=SPEC.to_dict(), restore_relevant=relevant, argv=[],
                    was_running=True, live=False, disk_snapshots=[],
                    files={"memory": FileEntry(10, "ab")},
                    migration={generation.RECORD: GUID} if device else {})


def test_every_fork_gets_a_new_id_and_a_state_without_the_device_none(tmp_path: Path) -> None:
    assert generation.for_load(tmp_path, _manifest(), fork=True) == "auto"
    assert generation.for_load(tmp_path, _manifest(device=False), fork=True) is None
    assert generation.for_load(tmp_path, _manifest(device=False), fork=False) is None


def test_only_the_vms_own_hibernation_image_keeps_its_id(tmp_path: Path) -> None:
    m = _manifest("hibernation")
    # Arrived from elsewhere (bimport, bmove carry only the manifest's files): a fork.
    assert generation.for_load(tmp_path, m, fork=False) == "auto"
    (tmp_path / generation.OWN).write_text(GUID + "\n")
    assert generation.for_load(tmp_path, m, fork=False) == GUID
    assert generation.for_load(tmp_path, m, fork=True) == "auto"
    (tmp_path / generation.OWN).write_text("11111111-2222-3333-4444-555555555555\n")
    assert generation.for_load(tmp_path, m, fork=False) == "auto"


def test_the_device_is_the_states_not_a_setting_to_compare() -> None:
    m = _manifest()
    assert settings_part(m.restore_relevant) == SPEC.restore_relevant()
    for spec in (SPEC, dataclasses.replace(SPEC, genid="off")):
        assert incompatibility(m, spec.restore_relevant(), "tcg", "7.2.22",
                               lambda _: True) is None


def test_bmigrate_carries_the_source_qemus_generation() -> None:
    """Live migration continues the same guest: the node's QEMU has the device exactly when
    the source's has, with the same ID; a sender without the key had no device."""
    import json

    from cbsd.core.hosts.migrate_in import _request

    good = {"spec": SPEC.to_dict(), "sizes": {"dsk1.qcow2": 1 << 30}, "paused": False,
            "source": {"qemu": "7.2.0", "accel": "tcg"}}
    assert _request(json.dumps({**good, "genid": GUID}).encode(), "x")[4] == GUID
    assert _request(json.dumps(good).encode(), "x")[4] is None
    for bad in ("auto", "x,guid=1", 5):
        with pytest.raises(UsageError, match="generation ID"):
            _request(json.dumps({**good, "genid": bad}).encode(), "x")
