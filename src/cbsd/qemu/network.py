"""Host networking for nic=bridge: a tap per VM on a Linux bridge, and the network cbsd
manages itself, `cbsd0` (like libvirt's default network and Incus' incusbr0).

- The tap is QEMU's own (`-netdev tap,ifname=...`, created by QEMU, so the kernel removes it
  when QEMU ends -- also after a kill -9), and QEMU runs a one-line script cbsd writes to put
  it on the bridge before the guest runs (jails-system/VM/ifup: `ip link set TAP master BR up`;
  no user input reaches it but a validated interface name).
- cbsd0 is created on first use: a bridge with the address $CBSD_NET0 (default 10.77.0.1/24),
  dnsmasq (Debian's dnsmasq-base) for DHCP and DNS on it alone (leases in var/db/), IPv4
  forwarding, and NAT to the host's uplink (nftables: table `ip cbsd`). It stays up, as
  libvirt's default network does.
- cbsd0 belongs to one workdir per host (network namespace): its dnsmasq, leases and pid file
  live in that workdir, and a second dnsmasq could not bind the bridge's address. The owner
  is written on the bridge itself (its alias, `ip link show cbsd0` shows it), so it is
  host-wide, goes with the bridge, and needs no file outside the workdir; another workdir
  is refused with one line naming the owner (docs/networking.md).
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import subprocess
from pathlib import Path

from cbsd import debug
from cbsd.errors import CbsdError, StateError, UsageError
from cbsd.names import check_ifname

MANAGED = "cbsd0"


def subnet() -> ipaddress.IPv4Interface:
    try:
        return ipaddress.IPv4Interface(os.environ.get("CBSD_NET0", "10.77.0.1/24"))
    except ValueError as e:
        raise UsageError(f"CBSD_NET0: {e} (e.g. CBSD_NET0=10.77.0.1/24)") from None


def tap_name(root: Path, jname: str, i: int = 0) -> str:
    """A stable tap name per VM and NIC (IFNAMSIZ allows 15 characters); NIC 0's is the
    one a VM's only NIC always had."""
    key = f"{root}:{jname}" + (f":{i}" if i else "")
    return "cbsdt" + hashlib.sha1(key.encode()).hexdigest()[:9]


def bridge_exists(name: str) -> bool:
    return Path(f"/sys/class/net/{name}/bridge").is_dir()


def write_ifup(path: Path, bridges: dict[str, str]) -> None:
    """The script QEMU runs with each new tap: the tap goes on its NIC's bridge (*bridges*:
    tap -> bridge; names checked, so nothing else reaches the script)."""
    cases = "".join(f'{check_ifname(tap)}) exec ip link set "$1" master '
                    f'{check_ifname(bridge)} up ;;\n' for tap, bridge in bridges.items())
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text('#!/bin/sh\n# Written by cbsd: QEMU runs it with each new tap.\n'
                   f'case "$1" in\n{cases}esac\nexit 1\n')
    os.chmod(tmp, 0o700)
    os.replace(tmp, path)


def _ip(*args: str) -> None:
    _run(["ip", *args])


def _run(argv: list[str], stdin: str | None = None) -> str:
    if debug.ON:
        debug.log("proc", " ".join(argv))
    try:
        res = subprocess.run(argv, input=stdin, capture_output=True, text=True, check=False,
                             timeout=30)
    except OSError as e:
        raise CbsdError(f"cannot run {argv[0]}: {e.strerror or e} (apt-get install "
                        f"{'nftables' if argv[0] == 'nft' else 'iproute2'})") from e
    if res.returncode != 0:
        raise CbsdError(f"{' '.join(argv[:3])}: {res.stderr.strip() or 'failed'}")
    return res.stdout


OWNER_PREFIX = "cbsd workdir "


def owner_tag(workdir: Path) -> str:
    """What cbsd0's alias says when *workdir* owns it (IFALIASZ: at most 255 bytes)."""
    return (OWNER_PREFIX + str(workdir))[:255]


def owner_of(alias: str) -> str | None:
    """The workdir an alias names ('' or another text: none)."""
    return alias[len(OWNER_PREFIX):] if alias.startswith(OWNER_PREFIX) else None


def _alias() -> str:
    try:
        return Path(f"/sys/class/net/{MANAGED}/ifalias").read_text().strip()
    except OSError:
        return ""


def _claim(workdir: Path) -> None:
    """cbsd0 for *workdir*: claimed if unowned (made here, or by a cbsd that did not write
    owners), refused if another workdir owns it."""
    alias = _alias()
    if alias == owner_tag(workdir):
        return
    owner = owner_of(alias)
    if owner is not None:
        raise StateError(
            f"cbsd0 belongs to the workdir {owner} (one workdir per host owns it: its "
            "dnsmasq and leases live there): use nic=bridge interface=BRIDGE with a bridge "
            f"of your own, or that workdir (CBSD_WORKDIR={owner}); if {owner} is gone, "
            "remove the network first (docs/networking.md)")
    _ip("link", "set", MANAGED, "alias", owner_tag(workdir))


def ensure_managed(run_dir: Path, db_dir: Path) -> None:
    """Bring cbsd0 up if it is not: bridge and address, forwarding, NAT, dnsmasq. Idempotent;
    the caller holds the network's lock (this workdir's: other workdirs are kept off by the
    owner on the bridge)."""
    net = subnet()
    workdir = run_dir.parent.parent  # WORKDIR/var/run
    if not bridge_exists(MANAGED):
        try:
            _ip("link", "add", MANAGED, "type", "bridge")
        except CbsdError:
            if not bridge_exists(MANAGED):
                raise  # else another workdir made it at the same instant: its owner decides
    _claim(workdir)
    # Whoever made the bridge: its owner sees to the address (two workdirs racing, the one
    # that made it may lose the claim before adding it).
    if str(net) not in _run(["ip", "-o", "-4", "addr", "show", "dev", MANAGED]).split():
        _ip("addr", "add", str(net), "dev", MANAGED)
    _ip("link", "set", MANAGED, "up")
    try:
        Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")
    except OSError as e:
        if debug.ON:
            debug.log("net", f"ip_forward not set: {e}")
    _ensure_nat(net)
    _ensure_dnsmasq(net, run_dir, db_dir)


def _ensure_nat(net: ipaddress.IPv4Interface) -> None:
    try:
        _run(["nft", "list", "table", "ip", "cbsd"])
        return
    except CbsdError:
        pass
    _run(["nft", "-f", "-"], stdin=(
        "table ip cbsd {\n"
        "  chain postrouting {\n"
        "    type nat hook postrouting priority srcnat; policy accept;\n"
        f'    ip saddr {net.network} oifname != "{MANAGED}" masquerade\n'
        "  }\n"
        "}\n"))


def _ensure_dnsmasq(net: ipaddress.IPv4Interface, run_dir: Path, db_dir: Path) -> None:
    pidfile = run_dir / f"dnsmasq-{MANAGED}.pid"
    try:
        pid = int(pidfile.read_text().strip())
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if str(pidfile).encode() in f.read():
                return  # running
    except (OSError, ValueError):
        pass
    hosts = list(net.network.hosts())
    first, last = hosts[min(9, len(hosts) - 1)], hosts[-1]
    _run(["dnsmasq", "--conf-file=/dev/null", f"--interface={MANAGED}", "--bind-interfaces",
          "--except-interface=lo", f"--listen-address={net.ip}",
          f"--dhcp-range={first},{last},12h", "--dhcp-authoritative",
          # Replies broadcast: a unicast reply reaches a guest through the tap with its UDP
          # checksum left to offload, and DHCP clients that read raw packets (busybox's
          # udhcpc, dhclient) drop it as corrupt (libvirt fills checksums for the same cause).
          "--dhcp-broadcast",
          f"--dhcp-leasefile={db_dir / f'{MANAGED}.leases'}", f"--pid-file={pidfile}",
          "--domain=cbsd", "--local=/cbsd/", "--expand-hosts"])


def lease_ip(db_dir: Path, mac: str) -> str | None:
    """The address cbsd0's DHCP server gave *mac* (dnsmasq's lease file), if any."""
    try:
        text = (db_dir / f"{MANAGED}.leases").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[1].lower() == mac.lower():
            return fields[2]
    return None
