"""The refusals checked before any QEMU is launched for a restore
(core/checkpoint/load.incompatibility):
configuration, accelerator, a newer QEMU, an unknown machine type -- without a QEMU."""

from __future__ import annotations

import pytest

from cbsd.core.checkpoint.load import incompatibility
from cbsd.storage.manifest import FileEntry, Manifest

RELEVANT = {"ram": 32 << 20, "cpus": 1, "machine": "pc-i440fx-7.2", "disks": ["dsk1.qcow2"]}


def saved(**over: object) -> Manifest:
    fields: dict[str, object] = dict(
        kind="checkpoint", name="c", jname="vm1", created="x", created_ts=0.0,
        qemu_version="7.2.22", accel="tcg", machine="pc-i440fx-7.2", spec={},
        restore_relevant=dict(RELEVANT), argv=[], was_running=True, live=False,
        disk_snapshots=[], files={"memory": FileEntry(1, "x")})
    fields.update(over)
    return Manifest(**fields)  # type: ignore[arg-type]


def known(machine: str) -> bool:
    return machine in ("pc-i440fx-7.2", "pc-i440fx-10.0")


@pytest.mark.parametrize(("manifest", "relevant", "accel", "version", "why"), [
    (saved(), RELEVANT, "tcg", "7.2.22", None),
    (saved(), RELEVANT, "tcg", "7.2.1", None),  # same minor release
    (saved(), RELEVANT, "tcg", "10.0.2", None),  # a newer QEMU loads older states
    (saved(), {**RELEVANT, "ram": 64 << 20}, "tcg", "7.2.22",
     "is incompatible with the VM's configuration now: ram was 33554432, now 67108864"),
    (saved(), {**RELEVANT, "disks": ["dsk1.qcow2", "dsk2.qcow2"]}, "tcg", "7.2.22",
     "disks was ['dsk1.qcow2'], now ['dsk1.qcow2', 'dsk2.qcow2']"),
    (saved(), RELEVANT, "kvm", "7.2.22", "was taken under tcg, this host runs kvm"),
    (saved(qemu_version="10.0.2"), RELEVANT, "tcg", "7.2.22",
     "was saved by QEMU 10.0.2, newer than this host's 7.2.22"),
    (saved(machine="pc-i440fx-11.0"), RELEVANT, "tcg", "10.0.2",
     "needs machine type pc-i440fx-11.0, which this QEMU 10.0.2 does not provide"),
])
def test_incompatibility(manifest: Manifest, relevant: dict[str, object], accel: str,
                         version: str, why: str | None) -> None:
    found = incompatibility(manifest, relevant, accel, version, known)
    if why is None:
        assert found is None
    else:
        assert found is not None and why in found
