"""Builds the test guests from sources in this folder and Debian packages, into a cache.

    counter  - tests/guests/counter.asm assembled with nasm: a boot sector printing a counter
               and keeping it on its disk (optionally filling N MiB of RAM at boot)
    linux    - Debian's cloud kernel (package downloaded and unpacked, not installed) with a
               busybox-static initramfs whose /init is linux_init.sh

Nothing built is committed; the cache key is a hash of the inputs.
Usage: python tests/guests/build.py [counter|linux] (prints the paths)
"""

from __future__ import annotations

import glob
import hashlib
import lzma
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
FILL_OFFSET = 0x1FC
CHURN_OFFSET = 0x1FA
LINUX_MODULES = ("virtio_pci", "virtio_blk", "virtio_net", "button", "evdev", "ata_piix",
                 "sr_mod")


def cache_dir() -> Path:
    d = Path(os.environ.get("CBSD_GUEST_CACHE", Path.home() / ".cache" / "cbsd-test-guests"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def _key(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(hashlib.sha256(p).digest())
    return h.hexdigest()[:16]


def counter_bin() -> Path:
    src = (HERE / "counter.asm").read_bytes()
    out = cache_dir() / f"counter-{_key(src)}.bin"
    if not out.exists():
        tmp = out.with_suffix(".tmp")
        subprocess.run(["nasm", "-f", "bin", "-o", str(tmp), str(HERE / "counter.asm")],
                       check=True)
        if tmp.stat().st_size != 512:
            raise RuntimeError("counter.asm must assemble to exactly 512 bytes")
        tmp.rename(out)
    return out


def counter_image(dest: Path, fill_mib: int = 0, size: int = 1 << 20,
                  churn_pages: int = 0) -> Path:
    """A raw disk: the boot sector (with FILL_MIB and CHURN_PAGES patched in), then zeros
    (LBA 1 = 0)."""
    code = bytearray(counter_bin().read_bytes())
    code[FILL_OFFSET:FILL_OFFSET + 2] = fill_mib.to_bytes(2, "little")
    code[CHURN_OFFSET:CHURN_OFFSET + 2] = churn_pages.to_bytes(2, "little")
    with open(dest, "wb") as f:
        f.write(code)
        f.truncate(size)
    return dest


# --- Linux guest ------------------------------------------------------------------------------

def kernel_root(flavour: str = "cloud-") -> Path:
    """Unpack linux-image-*-{flavour}amd64 (the package the metapackage depends on) into the
    cache. flavour "": the generic kernel (it has the vmgenid driver, the cloud one has not)."""
    meta = f"linux-image-{flavour}amd64"
    deps = subprocess.run(["apt-cache", "depends", meta], capture_output=True,
                          text=True, check=True).stdout
    m = re.search(rf"Depends: (linux-image-\S+-{flavour}amd64)", deps)
    if not m:
        raise RuntimeError(f"apt-cache knows no {meta}: run apt-get update")
    pkg = m.group(1)
    root = cache_dir() / pkg
    if (root / "done").exists():
        return root
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["apt-get", "download", pkg], cwd=tmp, check=True, capture_output=True)
        deb = next(Path(tmp).glob("*.deb"))
        shutil.rmtree(root, ignore_errors=True)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    (root / "done").touch()
    return root


def _modinfo_depends(data: bytes) -> list[str]:
    m = re.search(rb"(?:^|\0)depends=([^\0]*)", data)
    return [d for d in m.group(1).decode().split(",") if d] if m else []


# Where a kernel package keeps its modules: Debian 12 ships them under lib/modules, Debian 13
# (merged /usr in the package itself) under usr/lib/modules.
MODULE_DIRS = ("lib/modules", "usr/lib/modules")


def _module_files(root: Path) -> dict[str, Path]:
    """Every module of the unpacked kernel package at *root*, by name, on either layout."""
    files = {}
    for d in MODULE_DIRS:
        for p in glob.glob(str(root / d / "*/kernel/**/*.ko*"), recursive=True):
            name = Path(p).name.split(".ko")[0].replace("-", "_")
            files[name] = Path(p)
    if not files:
        raise RuntimeError(f"no kernel modules under {root} (looked in "
                           f"{', '.join(d + '/*/kernel' for d in MODULE_DIRS)})")
    return files


def _read_module(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".zst"):
        import zstandard

        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    return data


def _modules_in_order(root: Path) -> list[tuple[str, bytes]]:
    files = _module_files(root)
    order: list[tuple[str, bytes]] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen or name not in files:
            return  # built in, or not needed
        seen.add(name)
        data = _read_module(files[name])
        for dep in _modinfo_depends(data):
            visit(dep.replace("-", "_"))
        order.append((name, data))

    for mod in LINUX_MODULES:
        visit(mod)
    # A module the kernel has built in is no file, and needs none; one it has neither built in
    # nor as a file would leave the guest without its disk or console: say which, now.
    missing = [m for m in LINUX_MODULES if m not in seen and m not in _builtin_modules(root)]
    if missing:
        raise RuntimeError(f"the kernel package under {root} has no module {', '.join(missing)} "
                           "(neither a file nor built in): the test guest could not see its disk")
    return order


def _builtin_modules(root: Path) -> set[str]:
    """Names in the kernel's modules.builtin (either layout)."""
    names = set()
    for d in MODULE_DIRS:
        for f in glob.glob(str(root / d / "*/modules.builtin")):
            names |= {Path(line).name.split(".ko")[0].replace("-", "_")
                      for line in Path(f).read_text().split()}
    return names


def _cpio(entries: list[tuple[str, int, bytes]]) -> bytes:
    """newc archive; entries are (path, mode, data), directories with empty data."""
    out = bytearray()
    for ino, (name, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], start=1):
        nameb = name.encode() + b"\0"
        hdr = "070701" + "".join(f"{v:08x}" for v in (
            ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(nameb), 0))
        out += hdr.encode() + nameb
        out += b"\0" * (-len(out) % 4) + data
        out += b"\0" * (-len(out) % 4)
    return bytes(out)


def linux_guest() -> tuple[Path, Path]:
    """-> (kernel, initrd)."""
    root = kernel_root()
    kernel = next(root.glob("boot/vmlinuz-*"))
    busybox = Path(shutil.which("busybox") or "/bin/busybox")
    init = (HERE / "linux_init.sh").read_bytes()
    bb = busybox.read_bytes()
    if b"ld-linux" in bb[:4096] or b"/lib64/ld" in bb:
        raise RuntimeError(f"{busybox} is dynamically linked: install busybox-static")
    mods = _modules_in_order(root)
    key = _key(init, bb, kernel.name.encode(), *(m for _, m in mods))
    initrd = cache_dir() / f"linux-initrd-{key}.cpio"
    if not initrd.exists():
        entries = [(d, 0o40755, b"") for d in ("bin", "dev", "proc", "sys", "lib", "lib/modules")]
        entries += [("bin/busybox", 0o100755, bb), ("init", 0o100755, init),
                    ("modules.order", 0o100644, "\n".join(n for n, _ in mods).encode() + b"\n")]
        entries += [(f"lib/modules/{n}.ko", 0o100644, data) for n, data in mods]
        tmp = initrd.with_suffix(".tmp")
        tmp.write_bytes(_cpio(entries))
        tmp.rename(initrd)
    return kernel, initrd


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "all"
    if what in ("counter", "all"):
        print(counter_bin())
    if what in ("linux", "all"):
        print(*linux_guest())


# --- UEFI boot medium -------------------------------------------------------------------------

SYSTEMD_BOOT = Path("/usr/lib/systemd/boot/efi/systemd-bootx64.efi")


def uefi_iso(dest: Path) -> Path:
    """A CD that UEFI firmware boots (El Torito, no emulation, EFI platform): systemd-boot
    from Debian's systemd-boot-efi as EFI/BOOT/BOOTX64.EFI, one loader entry, and the Linux
    test guest's kernel and initramfs, all on a FAT image (dosfstools, mtools: no mount).
    The guest's disk stays free for its counter."""
    import io

    import pycdlib

    kernel, initrd = linux_guest()
    key = _key(SYSTEMD_BOOT.read_bytes(), kernel.name.encode(), initrd.name.encode())
    cached = cache_dir() / f"uefi-{key}.iso"
    if not cached.exists():
        with tempfile.TemporaryDirectory() as tmp:
            fat = Path(tmp) / "efi.img"
            size_kib = (kernel.stat().st_size + initrd.stat().st_size) // 1024 + 4096
            subprocess.run(["mkfs.vfat", "-C", "-n", "CBSDEFI", str(fat), str(size_kib)],
                           check=True, capture_output=True)
            entry = ("title cbsd test guest\nlinux /vmlinuz\ninitrd /initrd\n"
                     "options console=ttyS0 loglevel=4 panic=-1\n")
            files = {"loader.conf": "default cbsd.conf\ntimeout 0\n", "cbsd.conf": entry}
            for name, text in files.items():
                (Path(tmp) / name).write_text(text)
            env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
            for d in ("::/EFI", "::/EFI/BOOT", "::/loader", "::/loader/entries"):
                subprocess.run(["mmd", "-i", str(fat), d], check=True, env=env)
            for src, dst in ((SYSTEMD_BOOT, "::/EFI/BOOT/BOOTX64.EFI"), (kernel, "::/vmlinuz"),
                             (initrd, "::/initrd"), (Path(tmp) / "loader.conf",
                                                     "::/loader/loader.conf"),
                             (Path(tmp) / "cbsd.conf", "::/loader/entries/cbsd.conf")):
                subprocess.run(["mcopy", "-i", str(fat), str(src), dst], check=True, env=env)
            iso = pycdlib.PyCdlib()
            iso.new(interchange_level=3, joliet=3, vol_ident="CBSDUEFI")
            data = fat.read_bytes()
            iso.add_fp(io.BytesIO(data), len(data), "/EFI.IMG;1")
            iso.add_eltorito("/EFI.IMG;1", bootcatfile="/BOOT.CAT;1", media_name="noemul",
                             platform_id=0xEF, efi=True)
            tmp_iso = cached.with_suffix(".tmp")
            iso.write(str(tmp_iso))
            iso.close()
            tmp_iso.rename(cached)
    shutil.copy(cached, dest)
    return dest
