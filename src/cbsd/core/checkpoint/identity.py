"""A fork of a guest's state is a new machine: on the network (its NIC gets the definition's
MAC) and to its peers (a clone's guest gets a new machine-id and SSH host keys).

QEMU restores virtio-net's (and e1000's) state with the stream, the MAC included, and the
guest's driver read the MAC when it probed the device: a clone continuing from a copied
checkpoint would show the original's MAC until it reboots, and the two would fight over one
address on a bridge. No QMP command changes a realized NIC's MAC, and the guest would not
look again if one did. So the NIC is replaced, as a user would replace a card: hot-unplugged
and a new one hot-plugged with the definition's MAC at the same PCI slot (the guest sees the
old link go and a new one come, and asks DHCP again). Measured on QEMU 7.2 and 10 alike
(i440fx, ACPI PCI hotplug, which Linux has built in as acpiphp).

Order, so that the old MAC never reaches the network: while the guest is still paused after
the load, the link is set down (set_link on the netdev: the NIC drops what the guest sends)
and the unplug is requested; then the guest runs and ejects the card (the ACPI request waits
for it); then the new card is added and the link set up. The replacement has the same model,
properties and slot as the card on the command line, so a later checkpoint of the VM loads
into a freshly started QEMU as every other does.

The rule (load.py): every restore that forks state (a new generation, core/checkpoint/
generation.py) and whose definition's MAC differs from the MAC the saved device holds (the
manifest's definition, which bclone leaves the original's). A guest that never ejects the card
(no ACPI hotplug support, or a hung guest) within NIC_WAIT keeps the saved MAC: the link is set
up again and the command says so on stderr (docs/checkpoints.md).

machine-id and SSH host keys live in the guest's files (and memory), so only the guest can
change them. A state copied by bclone is marked (the manifest's migration[CLONE_OF]: the
original's name); every restore of such a state runs RENEW_SCRIPT in the guest through the
guest agent, in the detached helper that also sets the clock (qemu/agent.py), once the agent
answers. The same script runs at a clone's first boot from cloud-init (core/manage/
cloudinit.py). A guest with neither keeps both (docs/checkpoints.md says what to do).
"""

from __future__ import annotations

import sys
import time
from typing import Any

from cbsd import cancel, debug
from cbsd.core.vm.machine import VM
from cbsd.errors import QemuError
from cbsd.qemu.argv import NETDEV_ID, NIC_ID, nic_properties
from cbsd.qemu.qmp import Monitor
from cbsd.storage import ckpstore

CLONE_OF = "clone_of"  # the manifest's migration[CLONE_OF]: the VM a copied state came from

# Run by /bin/sh in the guest: a new machine-id (systemd-machine-id-setup; it would reuse a
# VM's SMBIOS UUID, and a random one is written if that gave the old ID back) and new SSH
# host keys (every type ssh-keygen -A makes), then sshd reloaded to serve them. Services that
# read the machine-id when they started (journald, dbus) keep the old one in memory until
# they restart or the guest reboots.
RENEW_SCRIPT = """\
old=$(cat /etc/machine-id 2>/dev/null)
rm -f /etc/machine-id
systemd-machine-id-setup >/dev/null 2>&1
new=$(cat /etc/machine-id 2>/dev/null)
if [ -z "$new" ] || [ "$new" = "$old" ]; then
  tr -d '-' < /proc/sys/kernel/random/uuid > /etc/machine-id
fi
if [ -f /var/lib/dbus/machine-id ] && [ ! -L /var/lib/dbus/machine-id ]; then
  cp /etc/machine-id /var/lib/dbus/machine-id
fi
if command -v ssh-keygen >/dev/null; then
  rm -f /etc/ssh/ssh_host_*_key /etc/ssh/ssh_host_*_key.pub
  ssh-keygen -A
  systemctl try-reload-or-restart ssh.service sshd.service 2>/dev/null || true
fi
echo "machine-id $(cat /etc/machine-id)"
"""

NIC_WAIT = 60.0  # seconds a restored guest has to eject its old card (it may be busy at first)


def saved_mac(m: ckpstore.Manifest) -> str:
    return str(m.spec.get("mac") or "")


def nic_to_renew(vm: VM, m: ckpstore.Manifest, *, fork: bool) -> bool:
    """Whether this load gives the guest a new NIC: a fork, with a NIC whose MAC the
    definition sets to another than the saved one."""
    return (fork and vm.spec.nic in ("user", "bridge") and bool(vm.spec.mac)
            and saved_mac(m).lower() != vm.spec.mac.lower())


def _slot(mon: Monitor) -> str | None:
    """The NIC's PCI address (slot.function, as device_add's addr= takes it), None if gone."""
    for bus in mon.cmd("query-pci"):
        for dev in bus.get("devices", []):
            if dev.get("qdev_id") == NIC_ID:
                return f"{int(dev['slot']):02x}.{int(dev['function'])}"
    return None


def unplug(vm: VM, mon: Monitor) -> str | None:
    """Before the guest runs: its link down, the unplug of its card requested. -> the slot,
    or None where QEMU cannot unplug it (a card on a bus without hotplug, such as q35's
    pcie.0): then the guest keeps the saved MAC, and the command says so."""
    addr = _slot(mon)
    if addr is None:
        raise QemuError(f"{vm.jname}: QEMU shows no network card {NIC_ID} after the load")
    mon.cmd("set_link", name=NETDEV_ID, up=False)
    try:
        mon.cmd("device_del", id=NIC_ID)
    except QemuError as e:
        mon.cmd("set_link", name=NETDEV_ID, up=True)
        print(f"{vm.jname}: cannot replace the network card ({e}): the guest keeps the "
              "checkpoint's MAC address until it reboots", file=sys.stderr)
        return None
    return addr


def plug(vm: VM, mon: Monitor, addr: str, seconds: float = NIC_WAIT) -> bool:
    """Once the guest runs: wait for it to eject the old card, add the new one at *addr* with
    the definition's MAC and set the link up. False (said on stderr) if the guest did not
    eject the card in time; the link is then up again with the saved MAC."""
    deadline = time.monotonic() + seconds
    pause = 0.01
    while _slot(mon) is not None:
        if time.monotonic() >= deadline:
            mon.cmd("set_link", name=NETDEV_ID, up=True)
            print(f"{vm.jname}: the guest did not release its network card within "
                  f"{seconds:g} s (no ACPI PCI hotplug?): it keeps the checkpoint's MAC "
                  f"address until it reboots, and loses the card if it releases it later",
                  file=sys.stderr)
            return False
        cancel.check()
        time.sleep(pause)
        pause = min(0.1, pause * 2)
    props: dict[str, Any] = nic_properties(vm.spec, addr)
    mon.cmd("device_add", **props)
    mon.cmd("set_link", name=NETDEV_ID, up=True)
    now = str(mon.cmd("qom-get", path=f"/machine/peripheral/{NIC_ID}", property="mac"))
    if debug.ON:
        debug.log("nic", f"{vm.jname}: card at {addr} replaced, MAC {now}")
    if now.lower() != vm.spec.mac.lower():
        raise QemuError(f"{vm.jname}: the new network card has MAC {now}, expected "
                        f"{vm.spec.mac}")
    return True


def guest_script(m: ckpstore.Manifest, *, fork: bool) -> str | None:
    """What to run in the restored guest: RENEW_SCRIPT for a state another VM's guest saved
    (a clone's copy), None otherwise (a VM's own checkpoint is the same machine)."""
    return RENEW_SCRIPT if fork and m.migration.get(CLONE_OF) else None
