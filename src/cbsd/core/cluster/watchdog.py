"""The watchdog backstop (opt-in: `bcluster ... watchdog=/dev/watchdog`). Fencing is done by
the keeper; if the keeper itself hangs (or is killed), nothing would stop this node's HA VMs
before the standby resumes them. Linux's watchdog device (softdog, or a hardware one) reboots
the host unless it is written to within its timeout: the keeper writes once per healthy
round -- lease renewed, or every HA VM fenced -- so a hung keeper stops writing and the kernel
reboots the host. The timeout is set to the lease's TTL where the driver allows it (ioctl
WDIOC_SETTIMEOUT), so the reboot comes before the standby acts (lease gone + margin).

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


class Watchdog:
    def __init__(self, path: str, timeout: int) -> None:
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        self.timeout = 0
        mode = os.fstat(self.fd).st_mode
        if (why := unfit(mode)) is not None:  # checked on what was opened: no race
            os.close(self.fd)
            raise WatchdogError(f"watchdog={path}: {why}")
        if stat.S_ISCHR(mode):
            with contextlib.suppress(OSError):  # a driver with a fixed timeout keeps it
                fcntl.ioctl(self.fd, WDIOC_SETTIMEOUT, struct.pack("i", timeout))
            with contextlib.suppress(OSError):
                self.timeout = struct.unpack(
                    "i", fcntl.ioctl(self.fd, WDIOC_GETTIMEOUT, struct.pack("i", 0)))[0]

    def pet(self) -> None:
        os.write(self.fd, b"\0")

    def disarm(self) -> None:
        """A clean stop (bcluster mode=leave): the magic close ('V', then close) disarms a
        driver that allows it; one built with nowayout reboots anyway, as asked."""
        with contextlib.suppress(OSError):
            os.write(self.fd, b"V")
        os.close(self.fd)
