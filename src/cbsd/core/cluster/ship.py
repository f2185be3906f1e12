"""Replication, the owner's half (docs/cluster.md "Replication"; the standby's half is
core/cluster/replica.py): `bcheckpoint mode=replicate jname=X [node=N]` and the periodic job
(core/cluster/hasched.py).

One replication, under the VM's lock:
  1. ask the standby what it has published (`cbsd breplica mode=status`, over ssh);
  2. take a live checkpoint ha-G (the existing save path: the guest pauses only while its
     disks are snapshotted and QEMU's background snapshot starts) and fold its memory into
     the VM's chunk store now, so its chunks are known;
  3. ship, as one sealed archive stream (storage/archive.py) into `cbsd breplica
     mode=apply` there: the checkpoint's manifest, the stream's chunk list, the chunks the
     standby lacks -- everything but what the base generation's recipe holds, when the
     standby's published generation is this node's ha-B with the same stream -- and each
     image's snapshot contents;
  4. on the standby's answer (it published G): drop the older ha-* checkpoints here, ha-G
     is the base of the next one. On any failure ha-G is dropped here and the standby keeps
     what it had: the next replication ships from the last acknowledged generation."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, cast

from cbsd.core.checkpoint import checkpoints, fold
from cbsd.core.cluster import config, delta, nodes
from cbsd.core.cluster.replica import ENTRY, KIND, NAME
from cbsd.core.vm.context import Context
from cbsd.core.vm.machine import VM
from cbsd.core.vm.moving import node_named
from cbsd.errors import CbsdError, NodeError, StateError, UsageError
from cbsd.failpoints import failpoint
from cbsd.model import HA_KEYS
from cbsd.qemu import img
from cbsd.ssh import Node
from cbsd.storage import ckpstore
from cbsd.storage.archive import FORMAT, HEADER, Source, Writer
from cbsd.storage.atomic import remove_tree, write_atomic
from cbsd.storage.chunkstore import RECIPE, Recipe, Store

APPLY_TIMEOUT = 3600.0


def check_settings(ctx: Context, changes: dict[str, Any]) -> None:
    """bset's ha keys: only on a cluster node, the standby another registered node."""
    if not any(k in changes for k in HA_KEYS):
        return
    cfg = config.load(ctx.workdir)
    if cfg is None:
        raise UsageError("bset: ha= and ha_node= need a cluster node ('cbsd bcluster "
                         "mode=init' or mode=join)")
    node = changes.get("ha_node")
    if node is not None:
        _standby(ctx, node, "bset: ha_node")


def _standby(ctx: Context, name: str, what: str) -> Node:
    """Node *name* as a standby: a node of the cluster other than this one, and a `cbsd
    node` of the same name (how it is reached)."""
    cfg = config.load(ctx.workdir)
    if cfg is None:
        raise UsageError(f"{what}: replication needs a cluster node")
    if name == cfg.node:
        raise UsageError(f"{what}: {name} is this node; the standby is another node")
    snap = nodes.snapshot(config.store(ctx.workdir, cfg))
    if name not in snap.nodes:
        raise UsageError(f"{what}: {name} is not a node of the cluster ('cbsd bcluster "
                         "mode=status')")
    try:
        return node_named(ctx, name)
    except CbsdError:
        raise UsageError(f"{what}: {name} is not a 'cbsd node' here (add it under the same "
                         "name: 'cbsd node mode=add')") from None


def generations(wd: Any, jname: str) -> dict[int, Path]:
    """This VM's ha-G checkpoints, by generation."""
    out = {}
    for p, _ in ckpstore.list_states(wd.checkpoints(jname)):
        name = ckpstore.state_name(p)
        if name.startswith(NAME) and name[len(NAME):].isdigit() and not p.name.startswith("."):
            out[int(name[len(NAME):])] = p
    return out


def replicate(ctx: Context, jname: str, node: str | None = None) -> str:
    with ctx.locked_vm(jname, "bcheckpoint replicate") as vm:
        target = node or vm.spec.ha_node
        if not target:
            raise UsageError(f"bcheckpoint: {jname} has no ha_node: give node=")
        peer = _standby(ctx, target, "bcheckpoint")
        cfg = config.load(ctx.workdir)
        assert cfg is not None  # _standby checked
        if not vm.alive():
            raise StateError(f"{jname}: replication needs the VM running or paused")
        if vm.spec.dedup == "off" or vm.uses_ram_file():
            raise StateError(f"{jname}: replication ships memory as chunks: it needs "
                             "vm_dedup=auto and guest RAM not in a file (vm_ramfile=off)")
        return _replicate_held(vm, peer, cfg.node)


def _replicate_held(vm: VM, peer: Node, me: str) -> str:
    wd, jname = vm.ctx.workdir, vm.jname
    try:
        there = json.loads(peer.call(["breplica", "mode=status", f"jname={jname}"]))
    except ValueError:
        raise NodeError(f"node {peer.name}: its answer to breplica is not JSON (is it a cbsd "
                        "of this version?)") from None
    have = there.get("generation") if isinstance(there, dict) else None
    local = generations(wd, jname)
    base = None
    if isinstance(have, int) and there.get("source") == me and have in local:
        m = ckpstore.read_manifest(local[have])
        if m.stream is not None and m.stream.xxh3_128 == there.get("stream"):
            base = have
    gen = max([*local, have if isinstance(have, int) else 0, 0]) + 1
    name = f"{NAME}{gen}"
    scratch = ckpstore.new_tmpdir(wd.system(jname) / "replicate.ckp")
    plan = delta.Plan(gen, base)
    try:
        plan = delta.prepare(vm, scratch, gen, base)
        checkpoints.create_held(vm, name, live=True, along=delta.along(plan))
        ckdir = wd.checkpoint(jname, name)
        delta.finish(vm, plan)
        m = ckpstore.read_manifest(ckdir)
        if not m.folded and ckdir not in fold.foldable(wd, jname):
            raise StateError(f"{jname}: replication ships memory as chunks: it needs "
                             "vm_dedup=auto and guest RAM not in a file (vm_ramfile=off)")
        if not m.folded and not fold.fold_one(Store(wd.store(jname)), ckdir, lambda: False):
            raise StateError(f"{jname}: checkpoint {name} does not match its own checksum")
        failpoint("replicate:taken")
        sent = _ship(vm, peer, ckdir, plan, scratch, local.get(base) if base else None, me)
    except BaseException:
        with contextlib.suppress(CbsdError, OSError):
            delta.close(vm, plan)  # what it leaves, the next prepare removes
        with contextlib.suppress(CbsdError, OSError):
            delta.drop(vm, gen)  # the base's bitmap stays: the next one ships from it
        if ckpstore.has_manifest(wd.checkpoint(jname, name)):
            with contextlib.suppress(CbsdError, OSError):
                checkpoints.drop(vm, name)  # the standby keeps what it had, so does the base
        raise
    finally:
        remove_tree(scratch)
    failpoint("replicate:acknowledged")
    _record(vm, peer.name, gen, base)
    delta.keep_only(vm, gen)
    for g, _ in sorted(local.items()):
        checkpoints.drop(vm, f"{NAME}{g}")
    ram = vm.spec.ram
    how = "; disks: " + ", ".join(sorted({plan.mode(i) for i in range(len(vm.images()))}))
    return (f"{jname}: generation {gen} replicated to {peer.name} ({sent['memory']} bytes of "
            f"memory chunks, {sent['disks']} of disks; {100 * sum(sent.values()) / ram:.1f}% "
            f"of its RAM{'' if base else '; full: no base there'}{how})")


CHAIN_KEPT = 20  # generations mode=list shows


def _record(vm: VM, node: str, gen: int, base: int | None) -> None:
    """The chain mode=list shows: each acknowledged generation and the one it was shipped
    on (None: whole), the last CHAIN_KEPT; a chain to another node, or from nothing, starts
    anew."""
    old = checkpoints.replicated(vm.ctx.workdir, vm.jname)
    chain = old.get("chain", []) if old.get("node") == node and base is not None else []
    write_atomic(vm.ctx.workdir.system(vm.jname) / checkpoints.REPLICATED, json.dumps({
        "node": node, "generation": gen, "time": time.time(),
        "chain": [*chain, [gen, base]][-CHAIN_KEPT:]}).encode())


def _ship(vm: VM, peer: Node, ckdir: Path, plan: delta.Plan, scratch: Path,
          base_dir: Path | None, me: str) -> dict[str, int]:
    """The stream into `breplica mode=apply` on *peer*; bytes sent by kind, once the
    standby said it published generation plan.gen."""
    wd, jname, gen = vm.ctx.workdir, vm.jname, plan.gen
    m = ckpstore.read_manifest(ckdir)
    recipe = Recipe.read(ckdir / RECIPE)
    known: set[bytes] = set()
    if base_dir is not None:
        known = {e[0] for e in Recipe.read(base_dir / RECIPE).entries}
    tags = {s.disk: s.tag for s in m.disk_snapshots}
    disks: dict[str, dict[str, Any]] = {}
    files: dict[str, Path] = {}
    for i, image in enumerate(vm.images()):
        files[image.name] = plan.deltas.get(i) or scratch / image.name
        if i not in plan.deltas:
            img.snapshot_to(Path(image.path), tags[image.name], files[image.name])
        disks[image.name] = {"size": int(img.info(Path(image.path))["virtual-size"]),
                             "mode": plan.mode(i)}
    failpoint("replicate:built")
    store = Store(wd.store(jname))
    entries = b"".join(ENTRY.pack(d, n) for d, _, _, n in recipe.entries)
    new, new_size = [], 0
    for digest, pack, offset, length in recipe.entries:
        if digest not in known:
            known.add(digest)
            new.append((recipe.packs[pack], offset, length))
            new_size += length
    head = {"format": FORMAT, "kind": KIND, "jname": jname, "generation": gen,
            "base": plan.base, "source": me, "spec": vm.spec.to_dict(), "disks": disks}
    proc = subprocess.Popen(peer.argv(["breplica", "mode=apply", f"jname={jname}"]),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        try:
            out = cast(IO[bytes], proc.stdin)
            w = Writer(out)
            w.add_bytes(HEADER, json.dumps(head).encode())
            w.add_bytes(ckpstore.MANIFEST, (ckdir / ckpstore.MANIFEST).read_bytes())
            w.add_bytes("entries", entries)
            w.add("chunks", Source(new_size, pieces=_chunks(store, new)))
            failpoint("replicate:shipping")
            for name in sorted(disks):
                w.add(f"disk/{name}", Source(files[name].stat().st_size, files[name]))
            w.close()
        except BrokenPipeError:
            pass  # the standby stopped reading: its answer says why
        finally:
            with contextlib.suppress(BrokenPipeError):
                cast(IO[bytes], proc.stdin).close()
            proc.stdin = None
        answer, err = proc.communicate(timeout=APPLY_TIMEOUT)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    if proc.returncode != 0:
        # What the standby refused is what this node sent (damaged on the way, or based on
        # a generation it no longer has): a failure of this command, not bad input to it.
        failed = peer.failed(proc.returncode, err)
        raise NodeError(str(failed), 1 if failed.exit_code == 2 else failed.exit_code)
    try:
        done = json.loads(answer)
    except ValueError:
        done = None
    if not isinstance(done, dict) or done.get("generation") != gen:
        raise NodeError(f"node {peer.name}: did not say it published generation {gen}")
    return {"memory": new_size, "disks": sum(f.stat().st_size for f in files.values())}


def _chunks(store: Store, refs: list[tuple[str, int, int]]) -> Iterator[bytes]:
    fds: dict[str, int] = {}
    try:
        for pack, offset, length in refs:
            fd = fds.get(pack)
            if fd is None:
                fd = fds[pack] = os.open(store.pack_path(pack), os.O_RDONLY | os.O_CLOEXEC)
            data = os.pread(fd, length, offset)
            if len(data) != length:
                raise StateError("a chunk pack ends early (the chunk store is damaged)")
            yield data
    finally:
        for fd in fds.values():
            os.close(fd)
