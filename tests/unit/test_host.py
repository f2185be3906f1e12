"""QEMU probing: what is cached, and that a changed binary is probed again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cbsd.qemu import host


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


def test_tcg_without_vmx_or_svm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CBSD_ACCEL", "tcg")
    assert host.kvm_usable() is False
