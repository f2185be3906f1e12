"""bcluster: init (the first member, its CA), issue (a joining node's bundle), join (as a
member or as a client of the etcd members), leave, status. The ownership guard every command
on a cluster node runs VM commands in is installed by guard.py (core/cluster/owner.py)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cbsd.core.cluster import config, fence, member, nodes, owner, pki, view
from cbsd.core.cluster import watchdog as wdog
from cbsd.core.cluster.config import Config
from cbsd.core.cluster.keeper import NOT_STARTED
from cbsd.core.cluster.store import (
    ClusterUnreachable,
    Delete,
    EtcdStore,
    Store,
    client_urls,
    member_remove,
)
from cbsd.core.vm.context import Context
from cbsd.detach import start_detached
from cbsd.errors import StateError, UsageError
from cbsd.names import check_name
from cbsd.storage.paths import Workdir


def _store(ctx: Context | Workdir) -> tuple[Config, Store]:
    wd = ctx if isinstance(ctx, Workdir) else ctx.workdir
    cfg = config.load(wd)
    if cfg is None:
        raise StateError("cluster: this host is not a cluster node ('cbsd bcluster mode=init' "
                         "or mode=join makes it one)")
    return cfg, config.store(wd, cfg)


def _fresh(ctx: Context, address: str) -> Path:
    if config.configured(ctx.workdir):
        raise StateError("cluster: this host is a cluster node already ('bcluster "
                         "mode=leave' first)")
    if not address or address in ("0.0.0.0", "::"):
        raise UsageError("bcluster: address= must be this node's own address (etcd never "
                         "listens on a wildcard)")
    d = config.folder(ctx.workdir)
    shutil.rmtree(d, ignore_errors=True)  # what a failed init/join left
    d.mkdir(mode=0o700, parents=True)
    return d


def _start_node(ctx: Context, cfg: Config, state: str | None) -> tuple[Store, list[str]]:
    """Start the member (unless a client), register the node, start its keeper, claim this
    host's VMs; the names another node owns already (not claimed)."""
    wd = ctx.workdir
    config.save(wd, cfg)
    if state is not None:
        member.start(wd, cfg, state)
    store = config.store(wd, cfg)
    member.wait_serving(store, config.folder(wd) / "etcd.log")
    host = ctx.host
    nodes.register(store, cfg.node, nodes.offer(cfg.address, host.version, host.accel))
    start_keeper(ctx)
    conflicts = []
    for jname in ctx.inventory.names():
        try:
            owner.claim_or_check(store, cfg.node, jname, "bcluster join")
        except owner.NotOwner:
            conflicts.append(jname)
    return store, conflicts


KEEPER_START = 60.0  # seconds a keeper gets to open its watchdog and say it runs (loaded host)


def start_keeper(ctx: Context) -> None:
    """Start the keeper unless it runs, and wait until it says it runs (its pid file, written
    once its watchdog is open); StateError with the keeper's reason if it ended instead (the
    device busy -- another watchdog daemon --, denied, or unfit): never "started" for a node
    whose HA VMs would run unfenced."""
    wd = ctx.workdir
    pid_file = config.keeper_pid(wd)
    if member._pid(pid_file) is not None:
        return
    pid_file.unlink(missing_ok=True)  # a dead keeper's
    log = config.keeper_log(wd)
    seen = log.stat().st_size if log.exists() else 0
    proc = start_detached([sys.executable, "-m", "cbsd.core.cluster.keeper", str(wd.root)])
    deadline = time.monotonic() + KEEPER_START
    while member._pid(pid_file) != proc.pid:
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.returncode is None:
                proc.kill()
                proc.wait()
            raise StateError(f"cluster: the keeper did not start: {_keeper_said(log, seen)}")
        time.sleep(0.05)


def _keeper_said(log: Path, offset: int) -> str:
    """The reason a keeper that gave up at its start logged (keeper.NOT_STARTED), after
    *offset* of its log."""
    try:
        with open(log, "rb") as f:
            f.seek(offset)
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        lines = []
    why = [ln.split(NOT_STARTED, 1)[1] for ln in lines if NOT_STARTED in ln]
    return why[-1] if why else f"it ended or did not answer (see {log})"


def _undo(ctx: Context) -> None:
    member.stop(config.keeper_pid(ctx.workdir))
    member.stop(member.pid_file(ctx.workdir))
    shutil.rmtree(config.folder(ctx.workdir), ignore_errors=True)


def _done(cfg: Config, conflicts: list[str], what: str) -> str:
    msg = f"node {cfg.node}: {what} ({cfg.client_url if cfg.member else 'client'})"
    if conflicts:
        msg += ("\nowned by another node, so left unchanged here (every change refused): "
                + ", ".join(conflicts))
    return msg


def _watchdog(path: str) -> str:
    """watchdog=: the device must be there and be a character device (opening it arms it:
    the keeper does that; it writes to it, so a disk given by mistake must never pass)."""
    if not path:
        return path
    try:
        mode = os.stat(path).st_mode
    except OSError:
        raise UsageError(f"bcluster: watchdog={path}: no such device (load softdog, or a "
                         "hardware watchdog's driver)") from None
    if (why := wdog.unfit(mode)) is not None:
        raise UsageError(f"bcluster: watchdog={path}: {why}")
    if not os.access(path, os.W_OK):
        raise StateError(f"bcluster: watchdog={path}: permission denied (the keeper must "
                         "write to it: run as root)")
    return path


def init(ctx: Context, node: str, address: str, ttl: int, watchdog: str = "") -> str:
    check_name(node, "node name")
    _watchdog(watchdog)
    d = _fresh(ctx, address)
    try:
        pki.make_ca(d)
        pki.issue(d, d, node, address)
        cfg = Config(node, address, [], True, ttl, {}, watchdog)
        cfg.endpoints, cfg.peers = [cfg.client_url], {node: cfg.peer_url}
        _, conflicts = _start_node(ctx, cfg, "new")
    except BaseException:
        _undo(ctx)
        raise
    return _done(cfg, conflicts, "cluster made, etcd member started")


def issue(ctx: Context, node: str, address: str, out: str) -> str:
    """A bundle for node *node* at *address*: the CA's certificate, its key and certificate,
    the endpoints to reach; only where the CA's key is (the init node)."""
    check_name(node, "node name")
    cfg, store = _store(ctx)
    d = config.folder(ctx.workdir)
    if not (d / "ca.key").is_file():
        raise StateError("cluster: this node has no CA key: issue on the node that ran init")
    dest = Path(out)
    try:
        dest.mkdir(mode=0o700)
    except FileExistsError:
        raise UsageError(f"bcluster: {dest} exists (cbsd does not overwrite it)") from None
    pki.issue(d, dest, node, address)
    urls = client_urls(store) if isinstance(store, EtcdStore) else cfg.endpoints
    (dest / "join.json").write_text(json.dumps({"endpoints": urls, "ttl": cfg.ttl}))
    return f"{dest}: bundle for node {node} (copy it there; 'cbsd bcluster mode=join')"


def join(ctx: Context, node: str, address: str, bundle: str, as_member: bool,
         watchdog: str = "") -> str:
    check_name(node, "node name")
    _watchdog(watchdog)
    src = Path(bundle)
    try:
        info = json.loads((src / "join.json").read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"bcluster: bundle={bundle}: not a bundle ({e})") from None
    d = _fresh(ctx, address)
    try:
        for f in ("ca.crt", "node.crt", "node.key"):
            shutil.copyfile(src / f, d / f)
            (d / f).chmod(0o600)
        cfg = Config(node, address, list(info["endpoints"]), as_member, int(info["ttl"]), {},
                     watchdog)
        state = None
        if as_member:
            remote = EtcdStore(cfg.endpoints, str(d / "ca.crt"), str(d / "node.crt"),
                               str(d / "node.key"))
            for m in _add_member(remote, cfg.peer_url):
                cfg.peers[m.get("name") or node] = m["peerURLs"][0]
            cfg.endpoints = [cfg.client_url, *cfg.endpoints]
            state = "existing"
        _, conflicts = _start_node(ctx, cfg, state)
    except BaseException:
        _undo(ctx)
        raise
    return _done(cfg, conflicts, "joined")


def _add_member(remote: EtcdStore, peer_url: str, timeout: float = 60.0
                ) -> list[dict[str, Any]]:
    """MemberAdd, again while etcd refuses it as unsafe (503: a member added moments ago has
    not been connected for etcd's health interval, 5 s, so a new one could cost the
    quorum); any other refusal, or still refused at *timeout*, is the answer."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return remote.member_add(peer_url)
        except ClusterUnreachable as e:
            if "Unavailable" not in str(e) or time.monotonic() > deadline:
                raise
        time.sleep(0.5)


def start(ctx: Context, watchdog: str | None = None) -> str:
    """Bring this node back after a reboot (or anything that ended its processes): the
    member, from its data (etcd ignores the initial-cluster flags then), and the keeper.
    *watchdog*: a device the keeper is to pet from now on ("none": no more); a keeper
    running already is started anew to take it."""
    cfg, store = _store(ctx)
    before = cfg.watchdog
    if watchdog is not None:
        # checked before the running keeper is stopped; what only opening tells (busy,
        # its timeout) the new keeper finds, and then the old one comes back
        cfg.watchdog = "" if watchdog == "none" else _watchdog(watchdog)
        config.save(ctx.workdir, cfg)
        member.stop(config.keeper_pid(ctx.workdir))
    if cfg.member:
        member.start(ctx.workdir, cfg, "existing")
    member.wait_serving(store, config.folder(ctx.workdir) / "etcd.log")
    try:
        start_keeper(ctx)
    except StateError:
        if cfg.watchdog != before:  # the keeper as it was: HA VMs are not left unfenced
            cfg.watchdog = before
            config.save(ctx.workdir, cfg)
            with contextlib.suppress(StateError):
                start_keeper(ctx)
        raise
    return f"node {cfg.node}: started" + (" (etcd member and keeper)" if cfg.member
                                          else " (keeper)")


def leave(ctx: Context) -> str:
    """Stop being a node: the keeper stops, the node's records go (its VMs' owner records
    too: they are this host's alone again), the member leaves the cluster and stops."""
    cfg, store = _store(ctx)
    # An HA VM here would run on unfenced (the keeper stops; a replication child it started
    # may still settle the record again) while its standby, seeing this node's alive key
    # gone, takes it over: two copies. HA is turned off first, on purpose.
    ha = sorted(fence.local_ha(ctx, unreadable=False))
    if ha:
        raise StateError(f"bcluster: {', '.join(ha)}: ha=1 here: turn ha off first "
                         f"('cbsd bset {ha[0]} ha=0'), or its standby would take it over "
                         "while it runs here")
    member.stop(config.keeper_pid(ctx.workdir))
    snap = nodes.snapshot(store)
    for jname, kv in snap.vms.items():
        if kv.json().get("node") == cfg.node:
            owner.settle(store, cfg.node, jname, "bcluster leave", exists=False, facts={})
    store.txn([], [Delete(nodes.NODE + cfg.node), Delete(nodes.ALIVE + cfg.node)])
    if cfg.member and isinstance(store, EtcdStore):
        member_remove(store, cfg.node)
    _undo(ctx)
    return f"node {cfg.node}: left the cluster"


def status(ctx: Context) -> list[dict[str, Any]]:
    _, snap = view.snapshot(ctx.workdir)
    return nodes.status_rows(snap)


def pick(ctx: Context, ram: int) -> str:
    _, snap = view.snapshot(ctx.workdir)
    chosen = nodes.pick(snap, ram)
    if chosen is None:
        raise StateError(f"bcreate node=auto: no live node has {ram >> 20} MiB free")
    return chosen


def hand_over(wd: Workdir, jname: str, to: str) -> Callable[[], None]:
    """bmove/bmigrate's switchover on a cluster node: the owner record goes to node *to*
    (which must be a live node of the cluster) in one compare-and-swap; the function that
    undoes it if the VM stays here. SSH-only: nothing to switch."""
    if not config.configured(wd):
        return lambda: None
    cfg, store = _store(wd)
    snap = nodes.snapshot(store)
    if to not in snap.nodes or not snap.up(to):
        raise StateError(f"{jname}: node {to} is not a live node of the cluster "
                         "('cbsd bcluster mode=status'): the VM stays here")
    owner.switch(store, cfg.node, jname, to)
    return lambda: owner.take_back(store, cfg.node, jname)


def taken_up(wd: Workdir, jname: str) -> None:
    """The target's half of a handover, at the moment the VM is in its inventory and before
    it tells the source so (bmigrate's answer; after it the source ends the ssh session,
    and this process may not live to leave its guard): the record drops "from"."""
    if not config.configured(wd):
        return
    cfg, store = _store(wd)
    owner.settle(store, cfg.node, jname, "bmigrate", exists=True, facts={})
