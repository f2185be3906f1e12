"""Clones of one checkpoint are distinct machines (issue 23, part 2), asserted on what the
guests show: a clone continuing from a copied checkpoint gets a new network card with its
own MAC (read inside the guest from /sys/class/net), asks cbsd0's DHCP server again and holds
its own lease; the original and its clones reach each other. `bclone count=N` makes them
all at once, all-or-nothing. The network exists only inside a namespace the test creates."""

from __future__ import annotations

import re

import pytest

from tests.guests.netns import Netns
from tests.harness import Cbsd, create_linux
from tests.integration.test_network import NET_CMDLINE, netcbsd, ns, type_on_console

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
