"""bmigrate's half on the node (core/hosts/migrate.py has the whole protocol): `bmigrate
mode=incoming` receives the VM, `mode=status` answers whether it has it (and clears a VM
that came in half-way)."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import IO, Any

from cbsd import specs
from cbsd.core.checkpoint import compat, tree
from cbsd.core.cluster import admin
from cbsd.core.hosts import migrate_ckp
from cbsd.core.manage import cloudinit
from cbsd.core.vm import definition, ramfile
from cbsd.core.vm.context import Context
from cbsd.core.vm.machine import VM
from cbsd.errors import QemuError, StateError, UsageError
from cbsd.failpoints import failpoint
from cbsd.model import BOOT_MEDIA, VMSpec
from cbsd.names import check_name
from cbsd.qemu import img, migration, process
from cbsd.qemu.runstate import MigrationStatus, RunState

UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def incoming(ctx: Context, jname: str, inp: IO[bytes], out: IO[str]) -> None:
    """The node's half (see the module's docstring); runs as long as the control ssh."""
    spec, source, sizes, paused, genid, current = _request(inp.readline(), jname)
    why = compat.host_incompatibility(ctx.host, spec, source, {"the VM": {
        "qemu": source["qemu"], "accel": source["accel"], "machine": spec.machine}})
    if why:
        raise StateError(f"{jname}: cannot migrate here: {why}")
    for medium in BOOT_MEDIA:
        path = getattr(spec, medium)
        if path and not Path(path).is_file():
            raise StateError(f"{jname}: its {medium}= {path} is missing on this host: copy "
                             "it here first (bmove carries it)")
    wd = ctx.workdir
    wd.ensure()
    with ctx.lock(jname, "bmigrate"):
        if ctx.inventory.get(jname) is not None or wd.system(jname).exists() or \
                wd.vm_dir(jname).exists():
            raise StateError(f"VM already exist: {jname} (on this node)")
        wd.system(jname).mkdir(mode=0o700)
        definition.mark_unfinished(ctx, jname)
        vm = VM(ctx, spec, runtime=(0, 0))
        try:
            wd.ensure_vm(jname)
            if current is not None:  # the VM's checkpoints follow the request
                migrate_ckp.receive(ctx, spec, sizes, inp)
                if current and wd.checkpoint(jname, current).is_dir():
                    tree.set_current(wd, jname, current)  # the tree goes on from there
            else:
                for im in vm.images():
                    img.create(Path(im.path), sizes[im.name])
            if spec.cloud_init:
                cloudinit.write_seed(wd.seed(jname), cloudinit.documents(jname,
                                                                         spec.cloud_init))
            _receive_vm(vm, paused, genid, inp, out)
        except BaseException:
            if vm.alive():
                vm.kill()
            definition.clear_unfinished(ctx, jname)
            raise


def _request(line: bytes, jname: str
             ) -> tuple[VMSpec, dict[str, Any], dict[str, int], bool, str | None, str | None]:
    """The sending host's request (the VM's definition, its source, its disks' sizes,
    whether its checkpoints follow: None if not, else the one the guest descends from or
    ''), checked as any definition from outside (specs.from_untrusted) before it is used:
    UsageError (exit 2) naming what is wrong."""
    what = f"{jname}: the request bmigrate sent"
    try:
        req = json.loads(line)
    except ValueError:
        raise UsageError(f"{what} is not JSON") from None
    if not isinstance(req, dict) or not isinstance(req.get("spec"), dict):
        raise UsageError(f"{what} holds no definition")
    spec = specs.from_untrusted({**req["spec"], "jname": jname}, f"{jname}: the definition "
                                "bmigrate sent")
    source = req.get("source")
    if not isinstance(source, dict) or not all(isinstance(source.get(k), str)
                                               for k in ("qemu", "accel")):
        raise UsageError(f"{what} does not say which QEMU it comes from")
    sizes = req.get("sizes")
    if not isinstance(sizes, dict) or any(
            isinstance(sizes.get(f), bool) or not isinstance(sizes.get(f), int) or
            not 0 < sizes[f] <= 1 << 50 for f, _ in VM.image_nodes(spec)):
        raise UsageError(f"{what} lacks a valid size for a disk")
    genid = req.get("genid")  # the source QEMU's generation ID; absent: no vmgenid device
    if genid is not None and not (isinstance(genid, str) and UUID.fullmatch(genid)):
        raise UsageError(f"{what} holds a bad generation ID")
    current = req.get("checkpoints")
    if current is not None and current != "":
        check_name(current, f"checkpoint in {what}")
    return spec, source, {f: int(sizes[f]) for f, _ in VM.image_nodes(spec)}, \
        req.get("paused") is True, genid, current


def _receive_vm(vm: VM, paused: bool, genid: str | None, inp: IO[bytes], out: IO[str]
                ) -> None:
    ctx, jname = vm.ctx, vm.jname
    mon = vm.launch(incoming=True, ram_file=ramfile.fresh(vm), generation=genid)
    caps = migration.capabilities(mon)
    migration.set_capabilities(mon, caps, {"late-block-activate": True})
    # Names as short as qmp.sock's: a Unix socket's path has at most 107 bytes.
    sockets = {k: str(ctx.workdir.system(jname) / f"{k[:3]}.sock")
               for k in ("nbd", "migration")}
    # SocketAddressLegacy: the address inside "data" (QEMU 7.2 and 10 alike)
    mon.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": sockets["nbd"]}})
    for node_name in (im.node for im in vm.images()):
        mon.cmd("block-export-add", type="nbd", id=f"mig-{node_name}",
                **{"node-name": node_name}, name=node_name, writable=True)
    mon.cmd("migrate-incoming", uri=f"unix:{sockets['migration']}")
    for path in sockets.values():
        os.chmod(path, 0o600)
    out.write(json.dumps(sockets) + "\n")
    out.flush()
    line = inp.readline()
    if not line or not json.loads(line).get("go"):
        raise StateError(f"{jname}: the migration was abandoned by the sending host")
    failpoint("bmigrate:go")
    deadline = time.monotonic() + 60
    while mon.status() == RunState.INMIGRATE:
        if time.monotonic() > deadline:
            raise QemuError(f"{jname}: the migration did not complete here")
        time.sleep(0.01)
    info = mon.cmd("query-migrate")
    if info.get("status") not in (None, MigrationStatus.COMPLETED):
        raise QemuError(f"{jname}: the migration failed here: "
                        f"{info.get('error-desc', info.get('status'))}")
    mon.cmd("nbd-server-stop")
    definition.save_spec_file(ctx, vm.spec)
    definition.unmark(ctx, jname)
    ctx.inventory.add(vm.spec)
    ctx.inventory.set_runtime(jname, vm.pid, vm.vnc_port)
    admin.taken_up(ctx.workdir, jname)  # a cluster's record: the VM is this node's now
    if paused:
        migration.activate_disks(mon)
    else:
        mon.cmd("cont")
    for path in sockets.values():
        Path(path).unlink(missing_ok=True)
    out.write(json.dumps({"running": not paused}) + "\n")
    out.flush()


def status(ctx: Context, jname: str) -> str:
    """'registered' or 'absent', once no bmigrate holds the VM here. A VM that came in
    half-way (its cbsd killed: files under the unfinished mark, maybe its QEMU still up,
    paused) is cleared first: the QEMU ended, the files removed."""
    wd = ctx.workdir
    with ctx.lock(jname, "bmigrate status", wait=120):
        if ctx.inventory.get(jname) is not None:
            return "registered"
        if wd.unfinished(jname).exists():
            marker = str(wd.qmp_sock(jname))
            try:
                pid = int(wd.pidfile(jname).read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid:
                process.kill(pid, marker, signal.SIGKILL)
                if not process.wait_gone(pid, marker, 10):
                    raise QemuError(f"{jname}: QEMU (pid {pid}) did not exit after SIGKILL")
            definition.clear_unfinished(ctx, jname)
        return "absent"


def main_incoming(ctx: Context, jname: str) -> int:
    incoming(ctx, jname, sys.stdin.buffer, sys.stdout)
    return 0
