"""The chunk store on plain files: folding, rebuilding, verifying, collecting."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import xxhash

from cbsd.errors import CheckpointError
from cbsd.storage.chunkstore import Recipe, Store, Yielded


def stream(path: Path, blocks: list[bytes]) -> Path:
    path.write_bytes(b"".join(blocks))
    return path


def digest(path: Path) -> str:
    return xxhash.xxh3_128_hexdigest(path.read_bytes())


@pytest.fixture
def blocks() -> list[bytes]:
    rnd = random.Random(7)
    return [rnd.randbytes(4096) for _ in range(1024)]  # 4 MiB of "guest pages"


def test_fold_rebuild_and_share(tmp_path: Path, blocks: list[bytes]) -> None:
    store = Store(tmp_path / "store")
    a = stream(tmp_path / "a", blocks)
    r1, d1 = store.fold(a, [])
    assert d1 == digest(a) and r1.size == a.stat().st_size
    changed = list(blocks)
    changed[100] = b"\1" * 4096  # one page changed, and 9 bytes inserted: offsets shift
    changed.insert(500, b"shifted!!")
    b = stream(tmp_path / "b", changed)
    r2, d2 = store.fold(b, [r1])
    assert d2 == digest(b)
    new = sum(len(p.read_bytes()) for p in (tmp_path / "store" / "packs").iterdir())
    assert new < a.stat().st_size + (256 << 10), "the second stream stored only its changes"
    for r, src in ((r1, a), (r2, b)):
        out = tmp_path / f"{src.name}.rebuilt"
        store.rebuild(r, out)
        assert out.read_bytes() == src.read_bytes()
        store.verify(r, src.stat().st_size, digest(src))
    again = Recipe.read(_write(tmp_path / "r2", r2))
    assert again == r2


def _write(path: Path, recipe: Recipe) -> Path:
    path.write_bytes(recipe.to_bytes())
    return path


def test_verify_finds_a_flipped_byte_and_a_missing_pack(tmp_path: Path,
                                                       blocks: list[bytes]) -> None:
    store = Store(tmp_path / "store")
    a = stream(tmp_path / "a", blocks)
    r, d = store.fold(a, [])
    (pack,) = (tmp_path / "store" / "packs").iterdir()
    data = bytearray(pack.read_bytes())
    data[12345] ^= 1
    pack.write_bytes(data)
    with pytest.raises(CheckpointError, match="does not match its checksum"):
        store.verify(r, r.size, d)
    pack.unlink()
    with pytest.raises(CheckpointError, match="is missing"):
        store.verify(r, r.size, d)


def test_read_back_checks_the_stored_copy_and_gives_way(tmp_path: Path,
                                                       blocks: list[bytes]) -> None:
    store = Store(tmp_path / "store")
    a = stream(tmp_path / "a", blocks)
    r, d = store.fold(a, [])
    store.read_back(r, d)
    with pytest.raises(Yielded):
        store.read_back(r, d, should_yield=lambda: True)
    with pytest.raises(CheckpointError, match="does not match the one saved"):
        store.read_back(r, digest(stream(tmp_path / "b", blocks[1:])))
    (pack,) = (tmp_path / "store" / "packs").iterdir()
    data = bytearray(pack.read_bytes())
    data[-1] ^= 1  # the last chunk: the read-back reads everything
    pack.write_bytes(data)
    with pytest.raises(CheckpointError, match="does not match its checksum"):
        store.read_back(r, d)


def test_a_truncated_or_foreign_recipe_is_refused(tmp_path: Path, blocks: list[bytes]) -> None:
    store = Store(tmp_path / "store")
    r, _ = store.fold(stream(tmp_path / "a", blocks), [])
    path = _write(tmp_path / "r", r)
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(CheckpointError, match="truncated"):
        Recipe.read(path)
    path.write_bytes(b"not a recipe")
    with pytest.raises(CheckpointError, match="not a chunk recipe"):
        Recipe.read(path)


def test_collect_frees_only_what_no_recipe_references(tmp_path: Path,
                                                      blocks: list[bytes]) -> None:
    store = Store(tmp_path / "store")
    a = stream(tmp_path / "a", blocks)
    r1, _ = store.fold(a, [])
    r2, _ = store.fold(stream(tmp_path / "b", blocks[:512] + [os.urandom(4096)] * 64), [r1])
    packs = tmp_path / "store" / "packs"
    assert len(list(packs.iterdir())) == 2
    (packs / ".tmp-dead.pack").write_bytes(b"x" * 8192)  # a killed fold's
    store.mark_dirty()
    store.collect([r1, r2])
    assert not (packs / ".tmp-dead.pack").exists() and not store.dirty()
    store.verify(r1, r1.size, digest(a))
    first = next(p for p in packs.iterdir() if p.name == f"{r1.packs[0]}.pack")
    before = first.stat().st_blocks
    store.collect([r2])  # r1 gone: only the first half of its pack is still referenced
    assert first.stat().st_blocks < before * 0.7, "dead ranges are punched out"
    assert first.stat().st_size == a.stat().st_size, "offsets stay valid"
    out = tmp_path / "b.rebuilt"
    store.rebuild(r2, out)
    assert out.read_bytes() == (tmp_path / "b").read_bytes()
    store.collect([])
    assert list(packs.iterdir()) == []


def test_a_fold_that_yields_leaves_nothing(tmp_path: Path, blocks: list[bytes]) -> None:
    store = Store(tmp_path / "store")
    with pytest.raises(Yielded):
        store.fold(stream(tmp_path / "a", blocks), [], should_yield=lambda: True)
    assert list((tmp_path / "store" / "packs").iterdir()) == []
    assert store.dirty(), "the next command checks the store"


def test_an_empty_stream(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    r, d = store.fold(stream(tmp_path / "e", []), [])
    assert r.entries == [] and r.size == 0 and d == xxhash.xxh3_128_hexdigest(b"")


def test_digest_of_a_sparse_file_counts_its_holes_as_zeros(tmp_path: Path) -> None:
    """A mapped-ram stream is a sparse file the size of RAM: holes are hashed without being
    read, and the digest is the one of the bytes the file reads as."""
    from cbsd.storage.ckpstore import digest_file

    for name, writes, size in (("sparse", [(5 << 20, 3 << 20), (40 << 20, 3)], 64 << 20),
                               ("hole-at-end", [(0, 4096)], 16 << 20),
                               ("dense", [(0, 10 << 20)], 10 << 20), ("empty", [], 0)):
        path = tmp_path / name
        with open(path, "wb") as f:
            f.truncate(size)
            for offset, n in writes:
                f.seek(offset)
                f.write(os.urandom(n))
        data = path.read_bytes()
        assert digest_file(path) == (len(data), xxhash.xxh3_128_hexdigest(data)), name
