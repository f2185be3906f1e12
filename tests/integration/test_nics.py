"""bhyve-nic through the CLI: several NICs per VM, each with its own MAC, seen by a real Linux
guest; a checkpoint of it restores with both working; detach and attach, and what they do to
checkpoints; definitions from before several NICs existed; bexport/bimport and bclone carry
the NIC list; bad input refused with one line and exit 2, nothing changed. The networks
exist only inside a network namespace the test creates (tests/guests/netns.py)."""

from __future__ import annotations

import json
import re
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from tests.guests.hosts import joined, moved
from tests.guests.netns import Netns
from tests.harness import COUNTER_RE, TICK_RE, Cbsd, create_linux
from tests.integration.test_network import (  # noqa: F401 -- fixtures, used by name
    NET_CMDLINE,
    netcbsd,
    ns,
    type_on_console,
)
from tests.vmchecks import checkpoint, restore

pytestmark = [pytest.mark.vm]

MAC_RE = r"52:54:00(:[0-9a-f]{2}){3}"


def nics(cbsd: Cbsd, jname: str) -> list[dict[str, object]]:
    return json.loads(cbsd("bhyve-nic", "mode=list", f"jname={jname}", "format=json").ok().out)


def guest_nics(cbsd: Cbsd, jname: str) -> list[tuple[str, str]]:
    """(interface, MAC) of each network card the guest sees (its /sys/class/net)."""
    con = cbsd.console(jname)
    mark = con.mark()
    type_on_console(cbsd, jname, "net", r"cbsd-guest: net end")
    return re.findall(r"cbsd-guest: net (eth\d+) ([0-9a-f:]{17})", con.since(mark))


def reaches(cbsd: Cbsd, jname: str, address: str, timeout: float = 90) -> None:
    """The guest pings *address* (one packet, 3 s) until one answer comes back: a single
    packet may be lost while a loaded host is slow to resolve the first ARP."""
    deadline = time.monotonic() + timeout
    while True:
        con = cbsd.console(jname)
        mark = con.mark()
        type_on_console(cbsd, jname, f"ping {address}",
                        rf"cbsd-guest: ping {re.escape(address)} (ok|failed)")
        if f"ping {address} ok" in con.since(mark):
            return
        assert time.monotonic() < deadline, f"{jname} never reached {address}"


def both_networks_answer(cbsd: Cbsd, jname: str) -> None:
    """The user NIC reaches QEMU's NAT gateway, the bridge NIC cbsd0's host side."""
    reaches(cbsd, jname, "10.0.2.2")
    reaches(cbsd, jname, "10.77.0.1")


@pytest.mark.linux
def test_a_guest_sees_two_nics_and_a_checkpoint_keeps_both(netcbsd: Cbsd, ns: Netns,  # noqa: F811
                                                          linux_guest) -> None:  # type: ignore[no-untyped-def]
    cbsd = netcbsd
    create_linux(cbsd, linux_guest, "m1", "nic=bridge", f"cmdline={NET_CMDLINE}")
    r = cbsd("bhyve-nic", "mode=attach", "jname=m1", "nic_type=user").ok()
    listed = nics(cbsd, "m1")
    assert [(n["nic_id"], n["nic_type"], n["nic_parent"]) for n in listed] == \
        [(1, "bridge", "cbsd0"), (2, "user", "")]
    macs = [str(n["nic_hwaddr"]) for n in listed]
    assert all(re.fullmatch(MAC_RE, m) for m in macs) and macs[0] != macs[1]
    assert r.out.strip() == f"m1: NIC 2 attached (user-mode NAT, nic_hwaddr={macs[1]})"
    text = cbsd("bhyve-nic", "mode=list", "jname=m1").ok().out.splitlines()
    assert text[0].split()[:4] == ["NIC_ID", "NIC_TYPE", "NIC_PARENT", "NIC_HWADDR"]
    assert [ln.split()[:4] for ln in text[1:]] == [["1", "bridge", "cbsd0", macs[0]],
                                                  ["2", "user", "-", macs[1]]]

    cbsd("bstart", "m1").ok()
    ip = cbsd.console("m1").wait(r"cbsd-guest: ip=(10\.77\.0\.\d+)", timeout=120)[0].group(1)
    # The guest's cards, in the definition's order, with the defined MACs.
    assert guest_nics(cbsd, "m1") == [("eth0", macs[0]), ("eth1", macs[1])]
    assert nics(cbsd, "m1")[0]["ip4_addr"] == ip, "cbsd0's lease, per NIC"
    type_on_console(cbsd, "m1", "ifaddr eth1 10.0.2.15/24", r"cbsd-guest: ifaddr eth1 ok")
    both_networks_answer(cbsd, "m1")
    for mode in ("attach", "detach"):  # a running VM holds its devices
        extra = ["nic_id=2"] if mode == "detach" else []
        cbsd("bhyve-nic", f"mode={mode}", "jname=m1", *extra).fails(
            1, "is On: cannot attach or detach NICs of it")
    assert len(nics(cbsd, "m1")) == 2

    cbsd("bcheckpoint", "mode=create", "jname=m1", "name=c1").ok()
    con = cbsd.console("m1")
    cbsd("bstop", "m1", "noacpi=1").ok()
    mark = con.mark()
    cbsd("bstart", "m1", "checkpoint=c1").ok()
    con.wait(TICK_RE, since=mark, count=2, timeout=60)
    assert "cbsd-guest: up" not in con.since(mark), "restored, not rebooted"
    assert guest_nics(cbsd, "m1") == [("eth0", macs[0]), ("eth1", macs[1])]
    both_networks_answer(cbsd, "m1")

    # Detach: the checkpoint holds two NICs and is refused, naming them; attaching a user
    # NIC again gives the VM the same device set and the checkpoint is restorable again.
    cbsd("bstop", "m1", "noacpi=1").ok()
    r = cbsd("bhyve-nic", "mode=detach", "jname=m1", f"nic_hwaddr={macs[1]}").ok()
    assert r.out.startswith(f"m1: NIC 2 detached (nic_hwaddr={macs[1]}); 1 left")
    assert "checkpoint(s) c1 hold the old NICs" in r.out
    assert [n["nic_hwaddr"] for n in nics(cbsd, "m1")] == [macs[0]]
    cbsd("bstart", "m1", "checkpoint=c1").fails(
        1, "its NICs were bridge,user (nic_type in order), now bridge")
    assert cbsd.status("m1") == "Off"
    assert not cbsd.checkpoints("m1")[0]["restorable"]
    cbsd("bhyve-nic", "mode=attach", "jname=m1", "nic_type=user").ok()
    assert cbsd.checkpoints("m1")[0]["restorable"]


def test_bad_input_is_refused_and_changes_nothing(cbsd: Cbsd, counter_image) -> None:  # type: ignore[no-untyped-def]
    cbsd("bcreate", "jname=vm1", f"image={counter_image()}", "vm_os_type=other",
         "vm_ram=32m", "hostfwd=tcp:2222:22").ok()
    mac1 = str(nics(cbsd, "vm1")[0]["nic_hwaddr"])
    spec_file = cbsd.system("vm1") / "vm.json"
    before = spec_file.read_bytes()
    attach = ("bhyve-nic", "mode=attach", "jname=vm1")
    for args, why in [
        ((*attach, "nic_type=tap"), "bad value for nic_type"),
        ((*attach, "nic_type=user", "nic_parent=br0"), "nic_parent= needs nic_type=bridge"),
        ((*attach, "hostfwd=tcp:2223:22"), "hostfwd= needs nic_type=user"),
        ((*attach, "nic_parent=bad/name"), "bad value for nic_parent"),
        ((*attach, "nic_hwaddr=01:00:5e:00:00:01"), "a unicast MAC address"),
        ((*attach, f"nic_hwaddr={mac1.upper()}"), "is the MAC of vm1's NIC 1"),
        ((*attach, "nic_type=user", "hostfwd=tcp:2222:80"), "forwarded twice"),
        ((*attach, "nic_address=10.0.0.1"), "unknown key 'nic_address'"),
        ((*attach, "nic_id=1"), "nic_id= is not used with mode=attach"),
        (("bhyve-nic", "mode=list", "jname=vm1", "nic_type=user"),
         "nic_type= is not used with mode=list"),
        (("bhyve-nic", "mode=detach", "jname=vm1"), "needs nic_id= or nic_hwaddr="),
        (("bhyve-nic", "mode=detach", "jname=vm1", "nic_id=1", f"nic_hwaddr={mac1}"),
         "needs nic_id= or nic_hwaddr="),
        (("bhyve-nic", "mode=detach", "jname=vm1", "nic_id=2"), "vm1 has no NIC nic_id=2"),
        (("bhyve-nic", "mode=detach", "jname=vm1", "nic_id=0"), "bad value for nic_id"),
        (("bhyve-nic", "mode=list", "jname=nosuch"), "nosuch"),
    ]:
        cbsd(*args).fails(2, why)
    assert spec_file.read_bytes() == before
    assert len(nics(cbsd, "vm1")) == 1
    for _ in range(7):
        cbsd(*attach).ok()
    cbsd(*attach).fails(2, "at most 8 NICs")
    assert len(nics(cbsd, "vm1")) == 8
    assert len({n["nic_hwaddr"] for n in nics(cbsd, "vm1")}) == 8, "each NIC its own MAC"
    # bset's nic=none would drop NIC 1 only: refused while there are others.
    cbsd("bset", "vm1", "nic=none").fails(2, "nic=none: the VM has 8 NICs")


def _old_definition(spec: dict[str, Any]) -> dict[str, Any]:
    """*spec* as a cbsd before bhyve-nic wrote it: the one NIC's keys at the top."""
    nic = spec["nics"][0]
    old = {k: v for k, v in spec.items() if k != "nics"}
    return {**old, "nic": nic["nic_type"], "mac": nic["nic_hwaddr"],
            "interface": nic["nic_parent"], "hostfwd": nic["hostfwd"]}


def test_a_definition_from_before_several_nics_reads_as_one_nic(cbsd: Cbsd, counter_image  # type: ignore[no-untyped-def]
                                                                ) -> None:
    cbsd("bcreate", "jname=vm1", f"image={counter_image()}", "vm_os_type=other",
         "vm_ram=32m", "nic=bridge", "interface=br7", "nic_hwaddr=52:54:00:aa:bb:01").ok()
    spec_file = cbsd.system("vm1") / "vm.json"
    old = _old_definition(json.loads(spec_file.read_text()))
    db = sqlite3.connect(cbsd.workdir / "var" / "db" / "local.sqlite")
    with db:
        db.execute("UPDATE vm SET spec = ? WHERE jname = 'vm1'", (json.dumps(old),))
    db.close()
    spec_file.write_text(json.dumps(old))
    want = [{"nic_id": 1, "nic_type": "bridge", "nic_parent": "br7",
             "nic_hwaddr": "52:54:00:aa:bb:01", "nic_driver": "e1000", "hostfwd": [],
             "ip4_addr": ""}]
    assert nics(cbsd, "vm1") == want
    assert cbsd("bget", "vm1", "nic_hwaddr").ok().out.strip() == "52:54:00:aa:bb:01"
    # A lost inventory: bregister reads the old vm.json the same way.
    for p in (cbsd.workdir / "var" / "db").glob("local.sqlite*"):
        p.unlink()
    cbsd("bregister", "jname=vm1").ok()
    assert nics(cbsd, "vm1") == want
    # The next write stores the list.
    cbsd("bhyve-nic", "mode=attach", "jname=vm1", "nic_type=user").ok()
    stored = json.loads(spec_file.read_text())
    assert "nic" not in stored and [n["nic_type"] for n in stored["nics"]] == ["bridge", "user"]


def test_export_import_and_clone_carry_every_nic(cbsd: Cbsd, counter_image,  # type: ignore[no-untyped-def]
                                                 tmp_path: Path) -> None:
    cbsd("bcreate", "jname=vm1", f"image={counter_image()}", "vm_os_type=other",
         "vm_ram=32m").ok()
    cbsd("bhyve-nic", "mode=attach", "jname=vm1", "nic_parent=br7").ok()
    cbsd("bhyve-nic", "mode=attach", "jname=vm1", "nic_type=user",
         "hostfwd=tcp:2299:22").ok()
    original = nics(cbsd, "vm1")
    archive = tmp_path / "vm1.cbsd"
    cbsd("bexport", "jname=vm1", f"out={archive}").ok()
    cbsd("bimport", f"in={archive}", "jname=imp").ok()
    assert nics(cbsd, "imp") == original
    cbsd("bclone", "old=vm1", "new=cl").ok()
    cloned = nics(cbsd, "cl")
    strip = [{k: v for k, v in n.items() if k != "nic_hwaddr"} for n in original]
    assert [{k: v for k, v in n.items() if k != "nic_hwaddr"} for n in cloned] == strip
    all_macs = [n["nic_hwaddr"] for vm in ("vm1", "cl") for n in nics(cbsd, vm)]
    assert len(set(all_macs)) == 6, "a clone's NICs get MACs of their own"


@pytest.mark.twohost
def test_bmove_carries_every_nic_and_a_checkpoint_of_them_restores_there(  # type: ignore[no-untyped-def]
        two, counter_image) -> None:
    a, b = two
    joined(a, b)
    a.cbsd("bcreate", "jname=vm1", f"image={counter_image()}", "vm_os_type=other",
           "vm_ram=32m").ok()
    a.cbsd("bhyve-nic", "mode=attach", "jname=vm1", "nic_type=user").ok()
    listed = nics(a.cbsd, "vm1")
    assert [n["nic_type"] for n in listed] == ["user", "user"]
    a.cbsd("bstart", "vm1").ok()
    a.cbsd.console("vm1").wait(COUNTER_RE, count=2)
    checkpoint(a.cbsd, "vm1", "c1")
    a.cbsd("bstop", "vm1", "noacpi=1").ok()
    a.cbsd("bmove", "jname=vm1", "node=b").ok()
    moved(a, b)
    assert nics(b.cbsd, "vm1") == listed
    restore(b.cbsd, "vm1", "c1")  # both NICs' state loads there: the guest goes on counting
