"""nic=bridge through the CLI, inside a network namespace the test creates (so cbsd0, its
dnsmasq, the bridges and the taps exist only there, and nothing reaches the host's real
interfaces or leaves the machine): two VMs on cbsd0 get addresses by DHCP and reach each
other; a VM on a bridge the user made; taps go away with QEMU, also after kill -9."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.guests.netns import Netns
from tests.harness import Cbsd, create_linux, kill_vms, proc_alive

pytestmark = [pytest.mark.vm, pytest.mark.linux]

NET_CMDLINE = "console=ttyS0 loglevel=4 panic=-1 cbsd.net=dhcp"


@pytest.fixture
def ns() -> Iterator[Netns]:
    ns = Netns.create("net")
    yield ns
    ns.delete()


@pytest.fixture
def netcbsd(tmp_path, ns: Netns) -> Iterator[Cbsd]:  # type: ignore[no-untyped-def]
    runner = Cbsd(tmp_path / "wd", prefix=ns.prefix)
    yield runner
    kill_vms(runner.workdir)
    pidfile = runner.workdir / "var" / "run" / "dnsmasq-cbsd0.pid"
    if pidfile.exists():  # cbsd0's dnsmasq lives as long as its network: end it with the test
        os.kill(int(pidfile.read_text()), signal.SIGTERM)


def type_on_console(cbsd: Cbsd, jname: str, line: str, answer: str) -> None:
    """Type *line* on the guest's serial console and wait for *answer* on it. The connection
    stays open until then: QEMU may drop what it has not read yet when its client hangs up."""
    con = cbsd.console(jname)
    mark = con.mark()
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(cbsd.system(jname) / "console.sock"))
        s.sendall(line.encode() + b"\n")
        con.wait(answer, since=mark, timeout=30)


def links(ns: Netns, *args: str) -> str:
    return ns.run("ip", "-o", "link", "show", *args).stdout


def test_two_vms_on_cbsd0_get_addresses_and_reach_each_other(netcbsd: Cbsd, ns: Netns,
                                                             linux_guest) -> None:  # type: ignore[no-untyped-def]
    cbsd = netcbsd
    for name in ("n1", "n2"):
        create_linux(cbsd, linux_guest, name, "nic=bridge", f"cmdline={NET_CMDLINE}")
        cbsd("bstart", name).ok()
    ips = {}
    for name in ("n1", "n2"):
        m = cbsd.console(name).wait(r"cbsd-guest: ip=(10\.77\.0\.\d+)", timeout=120)[0]
        ips[name] = m.group(1)
    assert ips["n1"] != ips["n2"]
    # cbsd0 exists in the test's namespace only; the VMs' taps are on it.
    assert "cbsd0" in links(ns) and "cbsd0" not in subprocess.run(
        ["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    assert len(re.findall(r"cbsdt\w+", links(ns, "master", "cbsd0"))) == 2
    for name in ("n1", "n2"):
        assert cbsd.bls(name)[0]["ip4_addr"] == ips[name], "bls shows the DHCP lease"
    type_on_console(cbsd, "n1", f"ping {ips['n2']}",
                    rf"cbsd-guest: ping {re.escape(ips['n2'])} ok")
    type_on_console(cbsd, "n1", "ping 10.77.0.1",  # the host side of cbsd0
                    r"cbsd-guest: ping 10\.77\.0\.1 ok")
    cbsd("bstop", "n2", "noacpi=1").ok()
    assert len(re.findall(r"cbsdt\w+", links(ns, "master", "cbsd0"))) == 1, "n2's tap went"


def test_a_vm_on_a_bridge_of_ones_own(netcbsd: Cbsd, ns: Netns, linux_guest) -> None:  # type: ignore[no-untyped-def]
    cbsd = netcbsd
    create_linux(cbsd, linux_guest, "b1", "nic=bridge", "interface=brtest",
                 f"cmdline={NET_CMDLINE}")
    cbsd("bstart", "b1").fails(1, "interface=brtest: no such bridge on this host")
    assert ns.run("ip", "link", "add", "brtest", "type", "bridge").returncode == 0
    ns.run("ip", "link", "set", "brtest", "up")
    cbsd("bstart", "b1").ok()
    assert re.findall(r"cbsdt\w+", links(ns, "master", "brtest")), "the tap is on brtest"
    assert "cbsd0" not in links(ns), "no managed network was made for it"
    # kill -9 of QEMU: the kernel drops its tap; the next start works.
    pid = cbsd.pid("b1")
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10  # the kernel unregisters a dead QEMU's tap shortly after
    while (proc_alive(pid) or re.findall(r"cbsdt\w+", links(ns, "master", "brtest"))) and \
            time.monotonic() < deadline:
        time.sleep(0.05)
    assert not re.findall(r"cbsdt\w+", links(ns, "master", "brtest")), "the tap went with QEMU"
    assert cbsd.status("b1") == "Off"
    cbsd("bstart", "b1").ok()
    assert re.findall(r"cbsdt\w+", links(ns, "master", "brtest"))


def test_network_keys_are_checked(cbsd: Cbsd, counter_image) -> None:  # type: ignore[no-untyped-def]
    img = counter_image()
    cbsd("bcreate", "jname=x", f"image={img}", "interface=br0").fails(
        2, "interface= needs nic=bridge")
    cbsd("bcreate", "jname=x", f"image={img}", "nic=bridge", "interface=bad/name").fails(
        2, "bad value for interface")
    cbsd("bcreate", "jname=x", f"image={img}", "nic=bridge", "hostfwd=tcp:2222:22").fails(
        2, "hostfwd= needs nic=user")
    assert cbsd.bls() == []
