"""libvirt, the peer cbsd is measured against, set up as FACTS.md describes for these machines
(no systemd: libvirtd under tini; QEMU as root; domains of type 'qemu' i.e. TCG), driving the
same QEMU with a guest equivalent to cbsd's."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

PACKAGES = ["libvirt-daemon", "libvirt-daemon-driver-qemu", "libvirt-clients", "tini"]
QEMU_CONF = Path("/etc/libvirt/qemu.conf")
SETTINGS = {"user": '"root"', "group": '"root"', "security_driver": '"none"',
            "stdio_handler": '"file"', "cgroup_controllers": "[ ]"}
URI = "qemu:///system"


def virsh(*args: str, check: bool = True) -> str:
    p = subprocess.run(["virsh", "-c", URI, *args], capture_output=True, text=True)
    if check and p.returncode != 0:
        raise RuntimeError(f"virsh {' '.join(args)}: {p.stderr.strip()}")
    return p.stdout


def ensure() -> str:
    """Install, configure and start libvirtd if needed; returns its version."""
    if not shutil.which("libvirtd"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
                       check=True, env=env, capture_output=True)
    for name in ("libvirt-qemu",):
        if subprocess.run(["getent", "group", name], capture_output=True).returncode:
            subprocess.run(["groupadd", "-r", name], check=True)
        if subprocess.run(["getent", "passwd", name], capture_output=True).returncode:
            subprocess.run(["useradd", "-r", "-g", name, "-s", "/usr/sbin/nologin", name],
                           check=True)
    conf = QEMU_CONF.read_text() if QEMU_CONF.exists() else ""
    changed = False
    for key, value in SETTINGS.items():
        line = f"{key} = {value}"
        if not re.search(rf"^{key}\s*=\s*{re.escape(value)}\s*$", conf, re.M):
            conf = re.sub(rf"^{key}\s*=.*$", "", conf, flags=re.M) + f"\n{line}\n"
            changed = True
    if changed:
        QEMU_CONF.write_text(conf)
    if changed or subprocess.run(["virsh", "-c", URI, "version"],
                                 capture_output=True).returncode != 0:
        subprocess.run(["pkill", "-x", "libvirtd"], check=False)
        time.sleep(0.5)
        subprocess.Popen(["setsid", "tini", "-s", "--", "libvirtd"], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
        deadline = time.monotonic() + 30
        while subprocess.run(["virsh", "-c", URI, "version"],
                             capture_output=True).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError("libvirtd did not start")
            time.sleep(0.2)
    m = re.search(r"libvirt ([\d.]+)", virsh("version"))
    return m.group(1) if m else "?"


def domain_xml(name: str, disk: Path, ram_mib: int, console_log: Path) -> str:
    """The same machine cbsd builds for an os_type=other VM: i440fx, qemu64, IDE disk, COM1."""
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>{ram_mib}</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
  <cpu mode='custom' match='exact'><model fallback='allow'>qemu64</model></cpu>
  <features><acpi/></features>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{disk}'/>
      <target dev='hda' bus='ide'/>
    </disk>
    <controller type='usb' model='none'/>
    <serial type='file'><source path='{console_log}' append='on'/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def define(name: str, disk: Path, ram_mib: int, console_log: Path, workdir: Path,
           replace: bool = True) -> None:
    """replace=False: the caller knows *name* is new (saves three virsh calls per domain)."""
    if replace:
        undefine(name)
    xml = workdir / f"{name}.xml"
    xml.write_text(domain_xml(name, disk, ram_mib, console_log))
    virsh("define", str(xml))


def undefine(name: str) -> None:
    virsh("destroy", name, check=False)
    virsh("managedsave-remove", name, check=False)
    virsh("undefine", name, "--managed-save", "--snapshots-metadata", check=False)
