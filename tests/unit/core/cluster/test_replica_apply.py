"""The standby's apply and promote (core/cluster/replica.py) against streams built here the
way core/cluster/ship.py builds them (memory only, or with disks on the fake QEMU's qemu-img):
what a stream without a base may share with the replica, what recovery keeps, when promote
refuses."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
import xxhash

from cbsd.core.cluster import replica
from cbsd.core.vm.context import Context
from cbsd.errors import StateError
from cbsd.model import VMSpec
from cbsd.qemu import img
from cbsd.storage import ckpstore
from cbsd.storage.archive import FORMAT, HEADER, Source, Writer
from cbsd.storage.chunkstore import RECIPE
from cbsd.storage.manifest import FileEntry, Manifest
from tests.unit.core.conftest import define

SPEC = VMSpec(jname="vm", ram=64 << 20, ram_file="off").to_dict()


def manifest(gen: int, memory: bytes) -> bytes:
    m = Manifest(kind="checkpoint", name=f"ha-{gen}", jname="vm", created="", created_ts=0.0,
                 qemu_version="", accel="", machine="", spec=SPEC, restore_relevant={},
                 argv=[], was_running=True, live=True, disk_snapshots=[],
                 files={RECIPE: FileEntry(0, "")},
                 stream=FileEntry(len(memory), xxhash.xxh3_128_hexdigest(memory)))
    return ckpstore.manifest_bytes(m)


def stream(gen: int, base: int | None, chunks: list[bytes], ship: list[bytes],
           disks: dict[str, tuple[int, Path]] | None = None) -> io.BytesIO:
    """Generation *gen* on *base*: memory *chunks* in order, *ship* the ones sent; *disks*:
    image -> (size, a qcow2 file sent in full)."""
    out = io.BytesIO()
    w = Writer(out)
    head: dict[str, Any] = {
        "format": FORMAT, "kind": replica.KIND, "jname": "vm", "generation": gen,
        "base": base, "source": "a", "spec": SPEC,
        "disks": {n: {"size": s, "mode": "full"} for n, (s, _) in (disks or {}).items()}}
    w.add_bytes(HEADER, json.dumps(head).encode())
    w.add_bytes(ckpstore.MANIFEST, manifest(gen, b"".join(chunks)))
    w.add_bytes("entries", b"".join(
        replica.ENTRY.pack(xxhash.xxh3_128_digest(c), len(c)) for c in chunks))
    w.add_bytes("chunks", b"".join(ship))
    for name, (_, path) in sorted((disks or {}).items()):
        w.add(f"disk/{name}", Source(path.stat().st_size, path))
    w.close()
    out.seek(0)
    return out


A, B, C = b"a" * 4096, b"b" * 4096, b"c" * 4096


def test_a_stream_without_a_base_applies_onto_a_replica_sharing_its_chunks(
        ctx: Context) -> None:
    assert replica.apply(ctx, "vm", stream(1, None, [A, B], [A, B]))["generation"] == 1
    # on 1: only C is new
    assert replica.apply(ctx, "vm", stream(2, 1, [A, C], [C]))["generation"] == 2
    # the owner lost its base (an ack lost, its ha-2 removed): everything is shipped, A and
    # C included, which the replica has
    assert replica.apply(ctx, "vm", stream(3, None, [C, A, B], [C, A, B]))["generation"] == 3
    rep = replica.latest(ctx.workdir, "vm")
    assert rep is not None and rep.generation == 3
    assert replica.apply(ctx, "vm", stream(4, 3, [B, A], []))["generation"] == 4


def test_promote_refuses_over_another_vm_of_the_same_name_and_keeps_the_replica(
        ctx: Context) -> None:
    replica.apply(ctx, "vm", stream(1, None, [A, B], [A, B]))
    define(ctx, "vm")  # say, a copy this node kept when the VM was taken from it once
    with pytest.raises(StateError, match="not this replica promoted: bremove it first"):
        replica.promote(ctx, "vm")
    rep = replica.latest(ctx.workdir, "vm")  # untouched
    assert rep is not None and rep.generation == 1 and rep.ckdir.is_dir()


def test_a_promote_cut_short_after_registering_finishes(ctx: Context) -> None:
    replica.apply(ctx, "vm", stream(1, None, [A, B], [A, B]))
    rep = replica.latest(ctx.workdir, "vm")
    assert rep is not None
    replica._register(ctx, rep, VMSpec(jname="vm", ram=64 << 20, ram_file="off"))
    assert replica.promote(ctx, "vm") == "ha-1"  # registered already: only the rest done
    assert replica.latest(ctx.workdir, "vm") is None
    assert ctx.inventory.get("vm") is not None


MIB = 1 << 20


def disks(tmp: Path, *names: str) -> dict[str, tuple[int, Path]]:
    out = {}
    for name in names:
        path = tmp / f"src-{name}.qcow2"
        if not path.exists():
            img.create(path, MIB)
        out[name] = (MIB, path)
    return out


def test_a_disk_detached_on_the_owner_leaves_the_replica_usable(
        ctx: Context, tmp_path: Path) -> None:
    replica.apply(ctx, "vm", stream(1, None, [A], [A], disks(tmp_path, "d0", "d1")))
    # d1 detached on the owner: generation 2 has d0 only
    assert replica.apply(ctx, "vm", stream(2, 1, [A], [], disks(tmp_path, "d0")))[
        "generation"] == 2
    assert replica.apply(ctx, "vm", stream(3, 2, [A], [], disks(tmp_path, "d0")))[
        "generation"] == 3
    root = replica.folder(ctx.workdir, "vm")
    assert sorted(p.name for p in (root / "disks").iterdir()) == ["d0"]


def test_an_apply_cut_short_while_adding_a_disk_leaves_the_replica_usable(
        ctx: Context, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    replica.apply(ctx, "vm", stream(1, None, [A], [A], disks(tmp_path, "d0")))
    real = img.snapshot_create

    def cut(image: Path, tag: str) -> None:
        if "d1" in image.name:
            raise KeyboardInterrupt  # as a kill -9 there leaves it
        real(image, tag)

    monkeypatch.setattr(img, "snapshot_create", cut)
    with pytest.raises(KeyboardInterrupt):
        replica.apply(ctx, "vm", stream(2, 1, [A], [], disks(tmp_path, "d0", "d1")))
    monkeypatch.setattr(img, "snapshot_create", real)
    rep = replica.recover(ctx.workdir, "vm")  # what a takeover's promote does first
    assert rep is not None and rep.generation == 1
    root = replica.folder(ctx.workdir, "vm")
    assert sorted(p.name for p in (root / "disks").iterdir()) == ["d0"]
    assert replica.apply(ctx, "vm", stream(2, 1, [A], [], disks(tmp_path, "d0", "d1")))[
        "generation"] == 2
    assert sorted(p.name for p in (root / "disks").iterdir()) == ["d0", "d1"]
    assert img.snapshots(root / "disks" / "d1") == ["cbsd-rep-2"]
