"""The Linux test guest's builder finds the kernel's modules on Debian 12's layout (lib/modules)
and Debian 13's (usr/lib/modules), and fails loudly, naming what is missing, rather than build an
initramfs whose guest cannot see its disk."""

from __future__ import annotations

import lzma
from pathlib import Path

import pytest

from tests.guests import build

VERSION = "6.99.0-1-cloud-amd64"


def fake_kernel(root: Path, layout: str, *, skip: tuple[str, ...] = (),
                builtin: tuple[str, ...] = ()) -> Path:
    """An unpacked kernel package: each of the guest's modules as a file (xz, as Debian 13
    ships them), virtio_blk depending on virtio_ring, except *skip*; *builtin* listed in
    modules.builtin instead."""
    top = root / layout / VERSION
    kdir = top / "kernel" / "drivers"
    kdir.mkdir(parents=True)
    deps = {"virtio_blk": "virtio_ring,virtio", "virtio_ring": "", "virtio": ""}
    for name in (*build.LINUX_MODULES, "virtio_ring", "virtio"):
        if name in skip or name in builtin:
            continue
        body = b"\x7fELF fake\0" + f"depends={deps.get(name, '')}\0name={name}\0".encode()
        (kdir / f"{name.replace('_', '-')}.ko.xz").write_bytes(lzma.compress(body))
    (top / "modules.builtin").write_text(
        "".join(f"kernel/drivers/{n}.ko\n" for n in builtin))
    return root


@pytest.mark.parametrize("layout", ["lib/modules", "usr/lib/modules"])
def test_modules_found_on_both_layouts(tmp_path: Path, layout: str) -> None:
    order = [n for n, _ in build._modules_in_order(fake_kernel(tmp_path, layout))]
    assert set(order) == {*build.LINUX_MODULES, "virtio_ring", "virtio"}
    # A module comes after what it depends on (the initramfs loads them in this order).
    assert order.index("virtio_ring") < order.index("virtio_blk")
    assert order.index("virtio") < order.index("virtio_blk")


@pytest.mark.parametrize("layout", ["lib/modules", "usr/lib/modules"])
def test_builtin_module_needs_no_file(tmp_path: Path, layout: str) -> None:
    order = [n for n, _ in build._modules_in_order(
        fake_kernel(tmp_path, layout, builtin=("virtio_pci", "virtio_blk")))]
    assert "virtio_blk" not in order and "virtio_pci" not in order
    assert "virtio_net" in order


def test_no_modules_at_all_is_a_loud_failure(tmp_path: Path) -> None:
    (tmp_path / "boot").mkdir()
    (tmp_path / "opt/modules" / VERSION / "kernel").mkdir(parents=True)  # neither layout
    with pytest.raises(RuntimeError, match=r"no kernel modules under .*lib/modules/\*/kernel"):
        build._modules_in_order(tmp_path)


def test_missing_module_is_named(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match=r"no module virtio_blk \(neither a file nor built in\)"):
        build._modules_in_order(fake_kernel(tmp_path, "usr/lib/modules", skip=("virtio_blk",)))
