"""The manifest schema: round trip, upgrade of every older format on read, refusal of newer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cbsd.errors import CheckpointError
from cbsd.storage import ckpstore
from cbsd.storage.manifest import FORMAT, DiskSnapshot, FileEntry, Manifest, upgrade
from tests.paths import UNIT_DATA as DATA


def sample() -> Manifest:
    return Manifest(kind="checkpoint", name="c", jname="vm1", created="2026-12-01T00:00:00.000Z",
                    created_ts=1.5, qemu_version="7.2.22", accel="tcg", machine="pc-i440fx-7.2",
                    spec={"jname": "vm1", "ram": 1 << 25}, restore_relevant={"ram": 1 << 25},
                    argv=["qemu"], was_running=True, live=False,
                    disk_snapshots=[DiskSnapshot("dsk1.qcow2", "cbsd-c-1")],
                    files={"memory": FileEntry(10, "ab")}, parent="b")


def test_round_trip() -> None:
    m = sample()
    assert Manifest.from_json(json.loads(json.dumps(m.to_json()))) == m
    assert m.to_json()["format"] == FORMAT


def test_a_format_1_checkpoint_reads_and_upgrades(tmp_path: Path) -> None:
    """A manifest as cbsd wrote it before format 2 (recorded from a real checkpoint)."""
    ck = tmp_path / "c.ckp"
    ck.mkdir()
    shutil.copy(DATA / "manifest-format1.json", ck / "manifest.json")
    m = ckpstore.read_manifest(ck)
    assert m.parent is None and m.name == "c" and m.kind == "checkpoint"
    assert m.disk_snapshots and m.disk_snapshots[0].disk == "dsk1.qcow2"
    assert m.memory_size == json.loads((ck / "manifest.json").read_text())["files"]["memory"][
        "size"]


def test_a_newer_format_is_refused_with_a_reason(tmp_path: Path) -> None:
    ck = tmp_path / "c.ckp"
    ck.mkdir()
    data = {**sample().to_json(), "format": FORMAT + 1}
    (ck / "manifest.json").write_text(json.dumps(ckpstore._seal(data)))
    with pytest.raises(CheckpointError, match="newer than this cbsd reads"):
        ckpstore.read_manifest(ck)


def test_a_manifest_missing_a_field_is_damaged(tmp_path: Path) -> None:
    ck = tmp_path / "c.ckp"
    ck.mkdir()
    data = sample().to_json()
    del data["files"]
    (ck / "manifest.json").write_text(json.dumps(ckpstore._seal(data)))
    with pytest.raises(CheckpointError, match="is damaged: its manifest lacks"):
        ckpstore.read_manifest(ck)


@pytest.mark.parametrize("bad", [None, 0, "1", -1])
def test_unknown_format_numbers(bad: object) -> None:
    with pytest.raises(ValueError, match="unknown manifest format"):
        upgrade({"format": bad})
