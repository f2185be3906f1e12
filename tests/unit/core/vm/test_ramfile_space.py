"""The admission rule for guest RAM in a file (core/vm/ramspace.py), as a table."""

from __future__ import annotations

from pathlib import Path

import pytest

from cbsd.core.vm import ramspace
from cbsd.core.vm.ramspace import SLACK, MiB, refusal, required

WHERE = Path("/w/jails-system/vm1")


@pytest.mark.parametrize(("needs", "adds", "expected"), [
    ({}, 0, SLACK),                                       # nothing running, nothing added
    ({}, 192 * MiB, 192 * MiB + 3 * MiB + SLACK),         # one 192 MiB RAM file: 1/64 more
    ({"vm2": 64 * MiB}, 0, 64 * MiB + MiB + SLACK),       # another VM's need alone
    ({"vm2": 100 * MiB, "vm3": 92 * MiB}, 64 * MiB,       # every running VM counts
     256 * MiB + 4 * MiB + SLACK),
])
def test_required(needs: dict[str, int], adds: int, expected: int) -> None:
    assert required(needs, adds) == expected


@pytest.mark.parametrize(("free", "needs", "adds", "refused"), [
    (8 * MiB, {}, 196 * MiB, True),                  # the issue: 192 MiB guest, 8 MiB free
    (1 << 30, {}, 196 * MiB, False),                 # plenty
    (required({}, 196 * MiB), {}, 196 * MiB, False),  # exactly enough
    (required({}, 196 * MiB) - 1, {}, 196 * MiB, True),
    (300 * MiB, {"vm2": 192 * MiB}, 192 * MiB, True),  # enough for this one, not for both
    (300 * MiB, {"vm2": 0}, 192 * MiB, False),        # vm2 owns all its blocks: needs nothing
])
def test_refusal(free: int, needs: dict[str, int], adds: int, refused: bool) -> None:
    why = refusal("a checkpoint", free, needs, adds, WHERE)
    assert (why is not None) is refused
    if why is not None:
        need = -(-required(needs, adds) // MiB)
        assert f"a checkpoint needs {need} MiB free in {WHERE}" in why
        assert f"{-(-free // MiB)} MiB free" in why and "\n" not in why


def test_refusal_names_the_running_vms_whose_need_it_counts() -> None:
    why = refusal("a start", 100 * MiB, {"vm3": 10 * MiB, "vm2": 20 * MiB}, 192 * MiB, WHERE)
    assert why is not None and "30 MiB of it for the RAM of running VMs vm2, vm3" in why


@pytest.mark.parametrize(("arg", "path"), [
    (b"memory-backend-file,id=pc.ram,size=192M,mem-path=/w/jails-system/vm1/ram,share=on",
     "/w/jails-system/vm1/ram"),
    (b"memory-backend-file,id=pc.ram,mem-path=/a,,b/vm1/ram,share=on", "/a,b/vm1/ram"),
    (b"memory-backend-file,id=pc.ram,size=1M", None),
])
def test_mem_path_is_read_from_qemus_argv(arg: bytes, path: str | None) -> None:
    assert ramspace._mem_path(arg) == (Path(path) if path else None)


def test_a_file_fiemap_cannot_read_counts_whole(tmp_path: Path) -> None:
    """Where the filesystem is not XFS the whole size counts (btrfs rewrites every block
    anew); a file that is gone needs nothing."""
    f = tmp_path / "ram"
    f.write_bytes(b"x" * 8192)
    if ramspace._fs_magic(tmp_path) != ramspace.XFS_MAGIC:
        assert ramspace.still_needed(f) == 8192
    assert ramspace.still_needed(tmp_path / "gone") == 0
