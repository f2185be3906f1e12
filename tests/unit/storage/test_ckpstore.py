"""The checkpoint format detects damage: flipped bytes, truncation, missing files, edited
manifests; and publishing/recovery never exposes a half-written state."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cbsd.errors import CheckpointError
from cbsd.storage import ckpstore
from cbsd.storage.manifest import FileEntry, Manifest


def manifest_for(name: str, size: int, digest: str, created_ts: float | None = None) -> Manifest:
    created, ts = ckpstore.now_iso()
    return Manifest(kind="checkpoint", name=name, jname="vm1", created=created,
                    created_ts=ts if created_ts is None else created_ts, qemu_version="7.2.0",
                    accel="tcg", machine="pc-i440fx-7.2", spec={"ram": 32 << 20},
                    restore_relevant={}, argv=[], was_running=True, live=False,
                    disk_snapshots=[], files={"memory": FileEntry(size, digest)})


def make_state(directory: Path, name: str, payload: bytes = b"x" * 100_000,
               created_ts: float | None = None) -> Path:
    final = directory / f"{name}.ckp"
    tmp = ckpstore.new_tmpdir(final)
    (tmp / "memory").write_bytes(payload)
    size, digest = ckpstore.digest_file(tmp / "memory")
    ckpstore.save_manifest(manifest_for(name, size, digest, created_ts), tmp)
    old = ckpstore.publish(tmp, final)
    if old:
        ckpstore.remove_tree(old)
    return final


def check(path: Path) -> None:
    ckpstore.verify_files(path, ckpstore.read_manifest(path))


def test_intact_state_verifies(tmp_path: Path) -> None:
    check(make_state(tmp_path, "a"))
    assert (tmp_path / "a.ckp").stat().st_mode & 0o777 == 0o700


def test_flipped_byte_is_detected(tmp_path: Path) -> None:
    p = make_state(tmp_path, "a")
    data = bytearray((p / "memory").read_bytes())
    data[5000] ^= 0x01
    (p / "memory").write_bytes(data)
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        check(p)


def test_truncation_is_detected(tmp_path: Path) -> None:
    p = make_state(tmp_path, "a")
    with open(p / "memory", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(CheckpointError, match="truncated"):
        check(p)


def test_missing_memory_is_detected(tmp_path: Path) -> None:
    p = make_state(tmp_path, "a")
    (p / "memory").unlink()
    with pytest.raises(CheckpointError, match="memory is missing"):
        check(p)


def test_missing_manifest_is_detected(tmp_path: Path) -> None:
    p = make_state(tmp_path, "a")
    (p / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="manifest is missing"):
        check(p)


def test_hand_edited_manifest_is_detected(tmp_path: Path) -> None:
    p = make_state(tmp_path, "a")
    m = json.loads((p / "manifest.json").read_text())
    m["files"]["memory"]["size"] = 1
    (p / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="altered"):
        check(p)


def test_garbage_manifest_is_detected(tmp_path: Path) -> None:
    p = make_state(tmp_path, "a")
    (p / "manifest.json").write_bytes(b"\x00{not json")
    with pytest.raises(CheckpointError, match="unreadable manifest"):
        check(p)


def test_partial_states_are_never_listed_and_are_recovered(tmp_path: Path) -> None:
    make_state(tmp_path, "a")
    partial = ckpstore.new_tmpdir(tmp_path / "b.ckp")
    (partial / "memory").write_bytes(b"half")
    assert [p.name for p, _ in ckpstore.list_states(tmp_path)] == ["a.ckp"]
    doomed = ckpstore.settle(tmp_path)
    assert doomed == [partial]


def test_crash_between_renames_keeps_the_old_state(tmp_path: Path) -> None:
    """publish() renames final -> .old then tmp -> final; dying in between must not lose it."""
    final = make_state(tmp_path, "a", b"old" * 1000)
    old = final.with_name(".a.ckp.old-1234")
    final.rename(old)  # the state right after the first rename
    assert ckpstore.settle(tmp_path) == []
    check(final)
    assert (final / "memory").read_bytes() == b"old" * 1000


def test_replacement_keeps_one_state(tmp_path: Path) -> None:
    make_state(tmp_path, "a", b"1" * 10)
    make_state(tmp_path, "a", b"2" * 10)
    states = ckpstore.list_states(tmp_path)
    assert len(states) == 1
    assert (states[0][0] / "memory").read_bytes() == b"2" * 10
    assert ckpstore.leftovers(tmp_path) == ([], [])


def test_list_is_oldest_first(tmp_path: Path) -> None:
    for ts, n in enumerate(("zeta", "alpha", "mid")):
        make_state(tmp_path, n, created_ts=1e9 + ts)  # distinct times: ties sort by name
    assert [p.name for p, _ in ckpstore.list_states(tmp_path)] == ["zeta.ckp", "alpha.ckp",
                                                                   "mid.ckp"]
