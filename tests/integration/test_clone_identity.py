"""Clones of one checkpoint are distinct machines (issue 23, part 2), asserted on what the
guests show: a clone continuing from a copied checkpoint gets a new network card with its
own MAC (read inside the guest from /sys/class/net), asks cbsd0's DHCP server again and holds
its own lease; the original and its clones reach each other. `bclone count=N` makes them
all at once, all-or-nothing. The network exists only inside a namespace the test creates."""

from __future__ import annotations

import json
import re
import time

import pytest

from tests.guests.debian_ssh import Debian
from tests.guests.netns import Netns
from tests.harness import COUNTER_RE, Cbsd, create_linux
from tests.integration.test_network import NET_CMDLINE, netcbsd, ns, type_on_console
from tests.integration.test_nics import guest_nics, nics

__all__ = ["netcbsd", "ns"]  # fixtures, used by name

pytestmark = [pytest.mark.vm, pytest.mark.linux]

# The Linux test guest prints this for every card that got an address (tests/guests/linux_init.sh)
IP_RE = r"cbsd-guest: ip=(10\.77\.0\.\d+) mac=([0-9a-f:]{17})"


def test_clones_of_one_checkpoint_hold_their_own_mac_and_address_on_cbsd0(
        netcbsd: Cbsd, ns: Netns, linux_guest) -> None:  # type: ignore[no-untyped-def]
    cbsd = netcbsd
    create_linux(cbsd, linux_guest, "orig", "nic=bridge", f"cmdline={NET_CMDLINE}")
    cbsd("bstart", "orig").ok()
    first = cbsd.console("orig").wait(IP_RE, timeout=120)[0]
    assert first.group(2) == cbsd("bget", "orig", "nic_hwaddr").ok().out.strip()
    cbsd("bcheckpoint", "mode=create", "jname=orig", "name=c").ok()
    cbsd("bstop", "orig", "noacpi=1").ok()
    out = cbsd("bclone", "old=orig", "new=web%d", "count=2", "checkpoint=c").ok().out
    assert out.split() == ["orig:", "cloned", "to", "web1,", "web2", "with", "checkpoint", "c"]
    names = ["orig", "web1", "web2"]
    macs = {n: cbsd("bget", n, "nic_hwaddr").ok().out.strip().lower() for n in names}
    assert len(set(macs.values())) == 3
    marks = {n: cbsd.console(n).mark() for n in names}
    for n in names:  # all three continue from the same instant
        cbsd("bstart", n, "checkpoint=c").ok()
    ips = {"orig": first.group(1)}
    for n in ("web1", "web2"):
        m = cbsd.console(n).wait(IP_RE, since=marks[n], timeout=120)[0]
        assert m.group(2) == macs[n], f"{n}'s guest shows its own MAC in /sys/class/net"
        ips[n] = m.group(1)
    assert len(set(ips.values())) == 3, ips
    for n in names:  # the leases cbsd0's dnsmasq holds, by each VM's own MAC
        assert cbsd.bls(n)[0]["ip4_addr"] == ips[n]
    for src, dst in (("web1", "orig"), ("web1", "web2"), ("web2", "orig"), ("orig", "web2")):
        type_on_console(cbsd, src, f"ping {ips[dst]}",
                        rf"cbsd-guest: ping {re.escape(ips[dst])} ok")
    # The clone's own checkpoint, taken with the card cbsd plugged in, restores into a fresh
    # QEMU like any other (same model and slot), and keeps the clone's MAC: no new card.
    cbsd("bcheckpoint", "mode=create", "jname=web1", "name=own").ok()
    cbsd("bstop", "web1", "noacpi=1").ok()
    mark = cbsd.console("web1").mark()
    cbsd("bstart", "web1", "checkpoint=own").ok()
    cbsd.console("web1").wait(r"tick n=\d+", since=mark, count=2)
    assert "ip=" not in cbsd.console("web1").since(mark)
    type_on_console(cbsd, "web1", f"ping {ips['web2']}",
                    rf"cbsd-guest: ping {re.escape(ips['web2'])} ok")
    # Restored paused, the guest cannot eject a card: nothing is replaced, and it says so.
    cbsd("bstop", "web2", "noacpi=1").ok()
    r = cbsd("bstart", "web2", "checkpoint=c", "paused=1").ok()
    assert f"web2: restored paused: the guest keeps the checkpoint's MAC address " \
        f"{macs['orig']} for NIC 1 (a restore that runs it gets {macs['web2']})" \
        in r.err.splitlines()


def test_a_clone_renews_every_nic_at_its_own_slot(
        netcbsd: Cbsd, ns: Netns, linux_guest) -> None:  # type: ignore[no-untyped-def]
    """Two cards on cbsd0: the clone's guest shows both new MACs (each card asked DHCP
    again), and its NICs keep their order (eth0 is NIC 1)."""
    cbsd = netcbsd
    create_linux(cbsd, linux_guest, "orig", "nic=bridge", f"cmdline={NET_CMDLINE}")
    cbsd("bhyve-nic", "mode=attach", "jname=orig", "nic_type=bridge").ok()
    cbsd("bstart", "orig").ok()
    cbsd.console("orig").wait(IP_RE, timeout=120, count=2)
    cbsd("bcheckpoint", "mode=create", "jname=orig", "name=c").ok()
    cbsd("bstop", "orig", "noacpi=1").ok()
    cbsd("bclone", "old=orig", "new=twin", "checkpoint=c").ok()
    mine = [str(n["nic_hwaddr"]) for n in nics(cbsd, "twin")]
    theirs = [str(n["nic_hwaddr"]) for n in nics(cbsd, "orig")]
    assert len(set(mine + theirs)) == 4, (mine, theirs)
    mark = cbsd.console("twin").mark()
    r = cbsd("bstart", "twin", "checkpoint=c").ok()
    assert "keeps the checkpoint's MAC" not in r.err, r.err
    got = {m.group(2) for m in cbsd.console("twin").wait(IP_RE, since=mark, timeout=120,
                                                          count=2)}
    assert got == set(mine)
    assert guest_nics(cbsd, "twin") == [("eth0", mine[0]), ("eth1", mine[1])]


def test_a_guest_without_acpi_keeps_its_mac_at_once(cbsd: Cbsd, counter_vm: str) -> None:
    """The boot-sector guest never switches ACPI on, so it could never eject its card: the
    clone's restore does not ask it to (no wait for an eject that cannot come) and says the
    guest keeps the saved MAC."""
    cbsd("bstart", counter_vm).ok()
    cbsd.console(counter_vm).wait(COUNTER_RE, count=1)
    cbsd("bcheckpoint", "mode=create", f"jname={counter_vm}", "name=c").ok()
    cbsd("bstop", counter_vm, "noacpi=1").ok()
    cbsd("bclone", f"old={counter_vm}", "new=copy", "checkpoint=c").ok()
    r = cbsd("bstart", "copy", "checkpoint=c").ok()
    assert "copy: NIC 1: the guest has not switched ACPI on, so it cannot release its " \
        "network card for a new one: the guest keeps the checkpoint's MAC address until it " \
        "reboots" in r.err.splitlines(), r.err
    assert "did not release" not in r.err


def test_bclone_count_is_all_or_nothing(cbsd: Cbsd, counter_vm: str) -> None:
    cbsd("bclone", "old=vm1", "new=web2").ok()
    before = sorted(p.name for p in cbsd.workdir.glob("*/*"))
    cbsd("bclone", "old=vm1", "new=web%d", "count=3").fails(
        2, "bclone: VM already exist: web2 (nothing was cloned)")
    cbsd("bclone", "old=vm1", "new=web", "count=2").fails(2, "count= needs new= with one %d")
    cbsd("bclone", "old=vm1", "new=web%d%d", "count=2").fails(2, "count= needs new= with one")
    cbsd("bclone", "old=vm1", "new=web%d").fails(2, "bad new 'web%d'")
    cbsd("bclone", "old=vm1", "new=w%d", "count=0").fails(2, "count")
    cbsd("bclone", "old=vm1", "new=w/%d", "count=2").fails(2, "bad new 'w/1'")
    assert [v["jname"] for v in cbsd.bls()] == ["vm1", "web2"]
    assert sorted(p.name for p in cbsd.workdir.glob("*/*")) == before, "no file was made"
    out = cbsd("bclone", "old=vm1", "new=x%d", "count=3").ok().out
    assert out.strip() == "vm1: cloned to x1, x2, x3"
    macs = {cbsd("bget", n, "nic_hwaddr").ok().out.strip() for n in ("vm1", "x1", "x2", "x3")}
    assert len(macs) == 4


# --- machine-id and SSH host keys (the Debian guest: systemd, sshd, cloud-init, an agent) ----

# What the guest shows: its machine-id, its SSH host key's fingerprint, its cards' MACs.
IDENTITY = ("cmd=cat /etc/machine-id; ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub | "
            "cut -d' ' -f2; cat /sys/class/net/e*/address")


def identity(cbsd: Cbsd, jname: str, timeout: float = 240) -> list[str]:
    """[machine-id, host key fingerprint, MAC...] read through the guest agent, once it answers."""
    deadline = time.monotonic() + timeout
    while (r := cbsd("bexec", f"jname={jname}", IDENTITY)).code != 0:
        assert time.monotonic() < deadline, f"{jname}'s agent never answered: {r.err}"
        time.sleep(1)
    return r.out.split()


def wait_renewed(cbsd: Cbsd, jname: str, old: list[str], timeout: float = 240) -> list[str]:
    deadline = time.monotonic() + timeout
    while (now := identity(cbsd, jname))[0] == old[0]:
        assert time.monotonic() < deadline, f"{jname} still has the original's machine-id"
        time.sleep(1)
    return now


@pytest.mark.debian
def test_a_debian_clone_gets_its_own_machine_id_host_keys_and_mac(deb: Debian) -> None:
    cbsd = deb.cbsd
    deb.start_from("ready")
    original = identity(cbsd, "deb")
    cbsd("bstop", "deb", "noacpi=1").ok()
    made = []
    try:
        # Continuing from a copied checkpoint: renewed through the agent, a new card.
        cbsd("bclone", "old=deb", "new=debclone", "checkpoint=ready").ok()
        made.append("debclone")
        boot = cbsd("bstart", "debclone", "checkpoint=ready").ok()
        assert "machine-id" not in boot.err, "the checkpoint had an agent: nothing to warn of"
        clone = wait_renewed(cbsd, "debclone", original)
        assert clone[1] != original[1], "the clone serves new SSH host keys"
        mac = cbsd("bget", "debclone", "nic_hwaddr").ok().out.strip().lower()
        assert clone[2:] == [mac] and original[2:] != [mac]
        ran = json.loads((cbsd.system("debclone") / "agent.json").read_text())["ran"]
        assert ran["exitcode"] == 0 and f"machine-id {clone[0]}" in ran["out"]
        cbsd("bstop", "debclone", "noacpi=1").ok()
        # A clone's first boot: cloud-init's new instance and cbsd's identity_id.
        cbsd("bclone", "old=deb", "new=debboot").ok()
        made.append("debboot")
        cbsd("bstart", "debboot").ok()
        booted = identity(cbsd, "debboot")
        assert booted[0] not in (original[0], clone[0])
        assert booted[1] not in (original[1], clone[1])
        cbsd("bstop", "debboot", "noacpi=1").ok()
    finally:
        for name in made:
            if cbsd.status(name) != "Off":
                cbsd("bstop", name, "noacpi=1")
            cbsd("bremove", name)
