"""QEMU probing: what is cached, and that a changed binary is probed again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cbsd.errors import QemuError
from cbsd.qemu import host
from tests.paths import UNIT_DATA as DATA


@pytest.fixture(autouse=True)
def fresh_probe() -> None:
    host.probe.cache_clear()


def test_probe_resolves_and_caches(tmp_path: Path) -> None:
    cache = tmp_path / "host-cache.json"
    h = host.probe(cache)
    assert h.version.count(".") >= 1
    assert host.resolve_machine(h, "pc").startswith("pc-i440fx-")
    assert host.machine_known(h, host.resolve_machine(h, "pc"))
    assert not host.machine_known(h, "no-such-machine")
    data = json.loads(cache.read_text())
    assert data["version"] == h.version and data["key"].startswith(h.qemu)
    assert cache.stat().st_mode & 0o077 == 0


def test_stale_cache_is_ignored(tmp_path: Path) -> None:
    cache = tmp_path / "host-cache.json"
    cache.write_text(json.dumps({"key": "/usr/bin/qemu-system-x86_64:1:1", "version": "0.1",
                                 "machines": []}))
    h = host.probe(cache)
    assert h.version != "0.1", "a cache for another binary (size/mtime) must not be trusted"
    assert json.loads(cache.read_text())["version"] == h.version


def test_cbsd_accel_overrides_detection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CBSD_ACCEL", "tcg")
    assert host.kvm_usable() is False


@pytest.mark.parametrize(("flags", "kvm_exists", "expected"), [
    ("fpu vme de pse tsc msr pae mce", True, False),  # no vmx/svm: nested KVM is slower
    ("fpu vme vmx pse", True, True),
    ("fpu svm pse", True, True),
    ("fpu vmxx svmx", True, False),  # whole words only
    ("fpu vmx pse", False, False),  # no usable /dev/kvm
])
def test_kvm_needs_vmx_or_svm_and_a_usable_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  flags: str, kvm_exists: bool,
                                                  expected: bool) -> None:
    monkeypatch.delenv("CBSD_ACCEL", raising=False)
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\n")
    kvm = tmp_path / "kvm"
    if kvm_exists:
        kvm.write_text("")
    assert host.kvm_usable(str(cpuinfo), str(kvm)) is expected


@pytest.mark.parametrize(("release", "version", "pc"), [
    ("7.2", "7.2.22", "pc-i440fx-7.2"),
    ("10.0", "10.0.2", "pc-i440fx-10.0"),
])
def test_recorded_qemu_outputs_parse(release: str, version: str, pc: str) -> None:
    """Parsing of what Debian 12's and Debian 13's QEMU print (recorded), without a QEMU."""
    assert host.parse_version((DATA / f"qemu-{release}-version.txt").read_text()) == version
    machines = host.parse_machines((DATA / f"qemu-{release}-machine-help.txt").read_text())
    h = host.Host(qemu="q", qemu_img="i", version=version, accel="tcg", qboot=None,
                  machines=tuple(machines))
    assert host.resolve_machine(h, "pc") == pc
    assert host.resolve_machine(h, "q35").startswith("pc-q35-")
    assert host.machine_known(h, pc) and host.machine_known(h, "pc-i440fx-7.2")
    assert not host.machine_known(h, "Supported")
    devices = host.parse_devices((DATA / f"qemu-{release}-device-help.txt").read_text())
    assert {"virtio-serial-pci", "virtserialport", "virtio-rng-pci", "ide-cd",
            "virtio-blk-pci"} <= devices
    assert host.Host(qemu="q", qemu_img="i", version=version, accel="tcg", qboot=None,
                     devices=frozenset(devices)).agent_channel


def test_a_cache_from_before_device_probing_is_probed_again(tmp_path: Path) -> None:
    first = host.probe(tmp_path / "c.json")
    data = json.loads((tmp_path / "c.json").read_text())
    del data["devices"]
    (tmp_path / "c.json").write_text(json.dumps(data))
    host.probe.cache_clear()
    assert host.probe(tmp_path / "c.json").devices == first.devices != frozenset()


def test_unparsable_version() -> None:
    assert host.parse_version("not qemu at all") is None


def test_cbsd_qemu_chooses_the_binaries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "qemu"
    fake.write_text("#!/bin/sh\necho 'QEMU emulator version 10.0.2'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CBSD_QEMU", str(fake))
    monkeypatch.setenv("CBSD_QEMU_IMG", str(fake))
    host.qemu_img_path.cache_clear()
    try:
        h = host.probe(tmp_path / "c.json")
        assert (h.qemu, h.qemu_img, h.version) == (str(fake), str(fake), "10.0.2")
        monkeypatch.setenv("CBSD_QEMU", str(tmp_path / "missing"))
        host.probe.cache_clear()
        with pytest.raises(QemuError, match=r"CBSD_QEMU=.*not an executable file"):
            host.probe(tmp_path / "c.json")
    finally:
        host.qemu_img_path.cache_clear()
