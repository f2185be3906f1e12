"""Builds the Debian 12 test guest from Debian's packages (debootstrap), into the guest cache.

    debian - bookworm, minbase + systemd, Debian's generic kernel (it has the vmgenid driver;
             the cloud flavour has not: docs/checkpoints.md), openssh-server, cloud-init
             (NoCloud only),
             qemu-guest-agent, sqlite3, chrony (no sources: it never reaches out), and a
             workload service (cbsd-workload) that commits a row to an SQLite database every
             100 ms with synchronous=FULL and keeps its last row number in /run (memory).

Output: a qcow2 root disk (ext4 made with mkfs.ext4 -d, no loop mount), the kernel and the
initrd from the image's /boot, and an SSH host key pair baked in (so the tests check the
guest's host key instead of trusting the first one they see). Nothing built is committed;
the cache key is a hash of everything below.

Nothing in the guest reaches the outside: cloud-init looks only for a NoCloud seed, chrony
has no servers, apt's timers are masked, and the tests run the VM's QEMU inside a network
namespace of their own (tests/guests/netns.py) where only loopback exists.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests.guests.build import cache_dir

SUITE = "bookworm"
PACKAGES = ("systemd-sysv", "udev", "dbus", "openssh-server", "sqlite3", "iproute2", "chrony",
            "linux-image-amd64", "initramfs-tools", "cloud-init", "python3-cffi-backend",
            "qemu-guest-agent", "iputils-ping", "procps", "isc-dhcp-client", "ifupdown", "sudo")

WORKLOAD = r'''#!/usr/bin/python3
# cbsd's test workload: a row every 100 ms, committed with synchronous=FULL; the number of
# the last committed row is also kept in memory (/run is a tmpfs): after a restore, the
# database on disk and the process's memory must agree.
import os, sqlite3, time
db = sqlite3.connect("/var/lib/cbsd-workload.db", isolation_level=None)
db.execute("PRAGMA synchronous=FULL")
db.execute("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, boot TEXT, ts REAL)")
boot = open("/proc/sys/kernel/random/boot_id").read().strip()
n = db.execute("SELECT coalesce(max(id), 0) FROM t").fetchone()[0]
while True:
    n += 1
    db.execute("INSERT INTO t VALUES (?, ?, ?)", (n, boot, time.time()))
    with open("/run/cbsd-workload.tmp", "w") as f:
        f.write(f"{n} {boot}\n")
    os.replace("/run/cbsd-workload.tmp", "/run/cbsd-workload.last")
    time.sleep(0.1)
'''

UNIT = '''[Unit]
Description=cbsd test workload (SQLite row every 100 ms)
[Service]
ExecStart=/usr/local/bin/cbsd-workload
Restart=no
[Install]
WantedBy=multi-user.target
'''

CLOUD_CFG = '''# cbsd test guest: NoCloud only, nothing fetched from anywhere.
datasource_list: [ NoCloud, None ]
locale: false
ssh_deletekeys: false
ssh_genkeytypes: []
system_info:
  network:
    renderers: [ eni ]
# Only the modules that act on what cbsd's seed holds (core/manage/cloudinit.py: hostname and
# fqdn, users with keys, bootcmd, passwords) or on the disk (growpart, resizefs). Each module
# dropped is work on every first boot under TCG: grub-dpkg (no GRUB here: QEMU loads the
# kernel) and apt-configure cost ~2.7 s of a cold boot; the rest are for other clouds.
cloud_init_modules: [ migrator, seed_random, bootcmd, write-files, growpart, resizefs,
  set_hostname, update_hostname, update_etc_hosts, users-groups, ssh ]
cloud_config_modules: [ set-passwords, runcmd ]
cloud_final_modules: [ scripts-per-once, scripts-per-boot, scripts-per-instance, scripts-user,
  final-message ]
'''

# Kernel modules udev would load for QEMU's PC devices that no test uses, each a probe on every
# boot (the floppy controller's is slow under TCG); `blacklist` stops only udev's automatic
# load. The CD-ROM (ata_piix, sr_mod: cloud-init's seed) and evdev (the ACPI power button that
# a `bstop` without noacpi presses) stay.
MODPROBE = '''# cbsd test guest: QEMU PC devices no test uses
blacklist floppy
blacklist pcspkr
blacklist kvm
blacklist kvm_amd
blacklist kvm_intel
blacklist powernow_k8
blacklist acpi_cpufreq
blacklist i2c_piix4
blacklist joydev
blacklist serio_raw
'''

CONFIG_SCRIPT = r'''set -e
echo "/dev/vda / ext4 rw,errors=remount-ro 0 1" > /etc/fstab
echo cbsd-debian > /etc/hostname
printf '127.0.0.1 localhost\n' > /etc/hosts
# chrony: no sources, so it never reaches out (the clock is cbsd's guest agent's job here)
sed -i -e '/^pool /d' -e '/^server /d' -e '/^sourcedir /d' /etc/chrony/chrony.conf
systemctl enable cbsd-workload.service
# Units a test VM never needs, each started on every boot: timers (apt, e2scrub, fstrim, dpkg's
# backup), e2scrub's reaper, binfmt (no foreign binaries), the VGA console's getty (the
# tests talk SSH and the agent; the serial console's getty stays).
systemctl mask apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer \
    dpkg-db-backup.timer e2scrub_reap.service systemd-binfmt.service getty@tty1.service \
    systemd-timesyncd.service 2>/dev/null || true
systemctl enable serial-getty@ttyS0.service qemu-guest-agent.service 2>/dev/null || true
passwd -l root
rm -f /etc/ssh/ssh_host_*
ssh-keygen -q -t ed25519 -N "" -f /etc/ssh/ssh_host_ed25519_key
# The generic kernel drives any PC; this guest is a QEMU VM: drop what it never loads (half
# of the disk) and build the initramfs with only what finds the root disk.
for d in sound drivers/gpu drivers/media drivers/net/wireless \
         drivers/infiniband drivers/staging drivers/bluetooth drivers/iio drivers/isdn \
         drivers/mtd drivers/net/can drivers/hwmon drivers/input/touchscreen; do
    rm -rf /lib/modules/*/kernel/$d
done
for v in $(ls /lib/modules); do depmod "$v"; done
echo MODULES=list > /etc/initramfs-tools/conf.d/cbsd
printf '%s\n' virtio_pci virtio_blk virtio_scsi sd_mod ahci nvme ext4 \
    > /etc/initramfs-tools/modules
update-initramfs -u -k all
apt-get clean
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin
'''


@dataclass(frozen=True)
class DebianGuest:
    disk: Path  # qcow2
    kernel: Path
    initrd: Path
    host_key: str  # the guest's SSH host public key ("ssh-ed25519 AAAA...")


def _mirror() -> str:
    try:
        for line in Path("/etc/apt/sources.list.d/debian.sources").read_text().splitlines():
            if line.startswith("URIs:") and line.rstrip().endswith("/debian"):
                return line.split(None, 1)[1].strip()
    except OSError:
        pass
    return "http://deb.debian.org/debian"


def _key() -> str:
    h = hashlib.sha256()
    for part in (SUITE, *PACKAGES, WORKLOAD, UNIT, CLOUD_CFG, MODPROBE, CONFIG_SCRIPT):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:16]


def debian_guest() -> DebianGuest:
    out = cache_dir() / f"debian-{_key()}"
    if not (out / "done").exists():
        _build(out)
    return DebianGuest(out / "disk.qcow2", out / "vmlinuz", out / "initrd.img",
                       (out / "ssh_host_ed25519_key.pub").read_text().strip())


def _build(out: Path) -> None:
    shutil.rmtree(out, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix="cbsd-debian-", dir=cache_dir()))
    try:
        root = work / "root"
        subprocess.run(["debootstrap", "--variant=minbase", "--include=" + ",".join(PACKAGES),
                        SUITE, str(root), _mirror()], check=True, stdout=subprocess.DEVNULL)
        (root / "usr/local/bin/cbsd-workload").write_text(WORKLOAD)
        os.chmod(root / "usr/local/bin/cbsd-workload", 0o755)
        (root / "etc/systemd/system/cbsd-workload.service").write_text(UNIT)
        (root / "etc/cloud/cloud.cfg.d/90-cbsd.cfg").write_text(CLOUD_CFG)
        (root / "etc/modprobe.d/cbsd-unused.conf").write_text(MODPROBE)
        subprocess.run(["chroot", str(root), "/bin/sh", "-c", CONFIG_SCRIPT], check=True)
        work_out = work / "out"
        work_out.mkdir()
        kernel = max((root / "boot").glob("vmlinuz-*"))
        initrd = max((root / "boot").glob("initrd.img-*"))
        shutil.copy(kernel, work_out / "vmlinuz")
        shutil.copy(initrd, work_out / "initrd.img")
        shutil.copy(root / "etc/ssh/ssh_host_ed25519_key.pub",
                    work_out / "ssh_host_ed25519_key.pub")
        raw = work / "disk.raw"
        subprocess.run(["mkfs.ext4", "-q", "-L", "root", "-d", str(root), str(raw), "3G"],
                       check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw),
                        str(work_out / "disk.qcow2")], check=True)
        (work_out / "done").touch()
        work_out.rename(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    g = debian_guest()
    print(g.disk, g.kernel, g.initrd, sep="\n")
    sys.exit(0)
