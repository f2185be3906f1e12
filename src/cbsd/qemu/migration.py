"""How cbsd hands QEMU a file to save a VM's state into or load it from, by what the QEMU in hand
offers (probed on the live QEMU with query-migrate-capabilities, never guessed from a version).

- QEMU 7.2: the file travels with `getfd` and the URI is `fd:NAME`.
- QEMU 9.0 and later (recognised by the `mapped-ram` capability, which came after `file:`):
  `fd:` migration to a plain file is deprecated there. The file goes into an fdset with
  `add-fd` and the URI is `file:/dev/fdset/N`; QEMU duplicates the descriptor, so it shares the
  file offset with cbsd's copy (the load is followed through it, as with `fd:`).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from cbsd.errors import QemuError, QmpCommandError
from cbsd.qemu.qmp import Monitor


@dataclass(frozen=True)
class Channel:
    uri: str
    fdset: int | None = None  # the fdset to remove once QEMU is done with the file


def capabilities(mon: Monitor) -> frozenset[str]:
    return frozenset(str(c["capability"]) for c in mon.cmd("query-migrate-capabilities"))


def has_file_uri(caps: frozenset[str]) -> bool:
    return "mapped-ram" in caps


def attach(mon: Monitor, fd: int, name: str, caps: frozenset[str],
           direct_fd: int | None = None) -> Channel:
    """Give QEMU the open file *fd* and return the URI that names it. *direct_fd*: the same
    file opened with O_DIRECT, for direct-io (its multifd channels take that one; the main
    channel's unaligned header and device state the other)."""
    if has_file_uri(caps):
        fdset = int(mon.add_fd(fd)["fdset-id"])
        if direct_fd is not None:
            mon.add_fd(direct_fd, fdset)
        return Channel(f"file:/dev/fdset/{fdset}", fdset)
    mon.send_fd(fd, name)
    return Channel(f"fd:{name}")


def detach(mon: Monitor, channel: Channel) -> None:
    """Release the fdset (QEMU closes its own copy when the migration ends). Best effort: a QEMU
    that has gone took its fdsets with it."""
    if channel.fdset is None or mon.closed:
        return
    with contextlib.suppress(QemuError):
        mon.cmd("remove-fd", **{"fdset-id": channel.fdset})


def set_capabilities(mon: Monitor, caps: frozenset[str], wanted: dict[str, bool]) -> None:
    """Set each capability this QEMU has to the wanted state (ones it lacks are off anyway)."""
    present = [{"capability": k, "state": v} for k, v in wanted.items() if k in caps]
    if present:
        mon.cmd("migrate-set-capabilities", capabilities=present)


def activate_disks(mon: Monitor) -> bool:
    """Make the disks writable again while the vCPUs stay stopped. After a completed migration
    (out of a saved VM, or into one launched with -S) QEMU 10 leaves them inactive until
    `cont`, and a write to an inactive disk aborts QEMU; `blockdev-set-active` (QEMU 10.0)
    activates them without running the guest. False where QEMU lacks it (7.2, whose incoming
    side activates them itself)."""
    try:
        mon.cmd("blockdev-set-active", active=True)
    except QmpCommandError as e:
        if e.error_class == "CommandNotFound":
            return False
        raise
    return True


# QEMU 9+: `mapped-ram` writes each RAM page at its own offset in the file (a sparse file the
# size of RAM) and lets `multifd` channels write and read RAM in parallel: on QEMU 10 here a
# 1 GiB / 768 MiB guest saved in 0.55x and loaded in 0.71x of the plain stream's time.
# `direct-io` (O_DIRECT for the multifd channels) keeps the saved RAM out of the page cache,
# and cbsd then reads it back from the disk for its checksum, and again before a restore:
# measured on QEMU 10 here, create took 1.5-1.6x and a warm restore 1.6-1.7x as long, a cold
# restore 1.04-1.11x (docs/benchmarks/engine-directio/). So it is off unless
# CBSD_DIRECT_IO=on (a host whose page cache matters more than checkpoint speed).
MAPPED_RAM = ("mapped-ram", "multifd")
DIRECT_IO = "direct-io"  # a migration parameter (QEMU 9.1+), not a capability
MULTIFD_CHANNELS = 4


def mapped_ram_usable(caps: frozenset[str], *, live: bool, ram_file: bool) -> bool:
    """Whether a save uses mapped-ram + multifd: the QEMU has both, the guest is stopped for
    the save (background-snapshot streams), RAM is in the stream (not a RAM file), and
    CBSD_MAPPED_RAM is not `off` (a way out should a QEMU's mapped-ram misbehave)."""
    if os.environ.get("CBSD_MAPPED_RAM", "auto") == "off":
        return False
    return not live and not ram_file and set(MAPPED_RAM) <= caps


def use_mapped_ram(mon: Monitor, caps: frozenset[str], on: bool) -> None:
    """Switch mapped-ram + multifd on or off (both sides of a migration must agree)."""
    set_capabilities(mon, caps, dict.fromkeys(MAPPED_RAM, on))
    if on:
        mon.cmd("migrate-set-parameters", **{"multifd-channels": MULTIFD_CHANNELS})


def direct_io_usable(mon: Monitor, path: Path) -> bool:
    """Whether a mapped-ram save or load of *path* uses direct-io: CBSD_DIRECT_IO=on asks for
    it, QEMU has the parameter, the file's filesystem takes O_DIRECT (tmpfs does not)."""
    if os.environ.get("CBSD_DIRECT_IO", "off") != "on":
        return False
    if DIRECT_IO not in mon.cmd("query-migrate-parameters"):
        return False
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC))
    except OSError:
        return False
    return True


def use_direct_io(mon: Monitor, on: bool) -> None:
    """Set direct-io as wanted (QEMU keeps parameters from one migration to the next)."""
    if on or DIRECT_IO in mon.cmd("query-migrate-parameters"):
        mon.cmd("migrate-set-parameters", **{DIRECT_IO: on})


def open_direct(path: Path, write: bool) -> int:
    return os.open(path, (os.O_WRONLY if write else os.O_RDONLY) | os.O_DIRECT | os.O_CLOEXEC)
