"""The watchdog backstop (opt-in: `bcluster ... watchdog=/dev/watchdog`). Fencing is done by
the keeper; if the keeper itself hangs (or is killed), nothing would stop this node's HA VMs
before the standby resumes them. Linux's watchdog device (softdog, or a hardware one) reboots
the host unless it is written to within its timeout: the keeper writes once per healthy
round, so a hung keeper stops writing and the kernel reboots the host. The reboot must come
before the lease can expire (last_ok + ttl - margin, fence.py): the keeper writes only while
one more timeout from now still ends before that (fence.pet_safe), or every HA VM is fenced.
So the timeout must be well under the TTL: the keeper asks for wanted_timeout (ioctl
WDIOC_SETTIMEOUT), reads back what the driver took (WDIOC_GETTIMEOUT) and refuses a device
whose timeout cannot protect (protects: a driver with a fixed 60 s timeout and a 10 s lease).

Opening the device arms it: tests on a shared machine never pass a real one (a regular file
stands in; it takes the writes and ignores the ioctls). Only a character device is accepted
-- the keeper, as root, writes to it five times a second: watchdog=/dev/sda would overwrite a
disk -- unless the test-only switch CBSD_TEST_WATCHDOG=1 is set, which lets a regular file
stand in (a test hook like CBSD_TEST_CLOCK, cbsd/clock.py; never set it on a real node)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import struct

from cbsd.core.cluster import fence

WDIOC_SETTIMEOUT = 0xC0045706  # _IOWR('W', 6, int)
WDIOC_GETTIMEOUT = 0x80045707  # _IOR('W', 7, int)


TEST_ENV = "CBSD_TEST_WATCHDOG"


def unfit(mode: int) -> str | None:
    """Why a file of *mode* (st_mode) may not be petted; None: it may (a character device,
    or a regular file under the test-only switch)."""
    if stat.S_ISCHR(mode):
        return None
    if stat.S_ISREG(mode) and os.environ.get(TEST_ENV) == "1":
        return None
    return "not a character device (a watchdog driver's device, such as /dev/watchdog)"


class WatchdogError(OSError):
    """The device cannot be used: not one, or its timeout cannot protect the lease."""


def wanted_timeout(ttl: float, margin: float) -> int:
    """The timeout asked of the driver (whole seconds, at least 1): the longest that keeps a
    lease renewed one round late (2/3 of the TTL old) inside the petting window -- petting
    stops, and fencing starts, at ttl - margin - timeout after the last renewal -- where the
    TTL allows it (ttl >= 3 * (margin + 1)); 1 s below that."""
    return max(1, int(ttl / 3 - margin))


def protects(ttl: float, margin: float, timeout: int) -> bool:
    """Whether a watchdog of *timeout* s can back a lease of *ttl*: a known timeout, and one
    that leaves a lease renewed on time (at most ttl/3 old) inside the petting window (or
    the keeper would fence, and stop petting, between any two renewals)."""
    return timeout >= 1 and ttl - margin - timeout > ttl / 3


class Watchdog:
    """The device, opened (armed) with a timeout that protects a lease of *ttl* s (fencing
    *margin*: fence.margin's by default); else WatchdogError, the device disarmed again."""

    def __init__(self, path: str, ttl: float, margin: float | None = None) -> None:
        margin = fence.margin(ttl) if margin is None else margin
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        mode = os.fstat(self.fd).st_mode
        if (why := unfit(mode)) is not None:  # checked on what was opened: no race
            os.close(self.fd)
            raise WatchdogError(f"watchdog={path}: {why}")
        want = wanted_timeout(ttl, margin)
        self.timeout = want  # a regular file (the tests' stand-in) takes no ioctl
        if stat.S_ISCHR(mode):
            self.timeout = 0  # unknown until the driver says
            with contextlib.suppress(OSError):  # a driver with a fixed timeout keeps it
                fcntl.ioctl(self.fd, WDIOC_SETTIMEOUT, struct.pack("i", want))
            with contextlib.suppress(OSError):
                self.timeout = struct.unpack(
                    "i", fcntl.ioctl(self.fd, WDIOC_GETTIMEOUT, struct.pack("i", 0)))[0]
        if not protects(ttl, margin, self.timeout):
            self.disarm()
            said = f"{self.timeout} s" if self.timeout else "not told by its driver"
            raise WatchdogError(
                f"watchdog={path}: its timeout ({said}; {want} s asked) cannot protect a "
                f"{ttl:g} s lease (it must be under {ttl - margin - ttl / 3:g} s)")

    def pet(self) -> None:
        os.write(self.fd, b"\0")

    def disarm(self) -> None:
        """A clean stop (bcluster mode=leave): the magic close ('V', then close) disarms a
        driver that allows it; one built with nowayout reboots anyway, as asked."""
        with contextlib.suppress(OSError):
            os.write(self.fd, b"V")
        os.close(self.fd)
