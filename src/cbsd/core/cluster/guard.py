"""The ownership guard's installation: the one function every process that changes VMs on a
cluster node calls on each Context it makes -- the CLI for its command (cli/main.py), the
service for every request's and operation's Context and for its schedules' ticks
(service/common.py). A Context it does not install the guard on changes VMs unguarded.

Light on purpose: every CLI command on a cluster node imports it; the etcd client (etcd3gw,
requests: 0.1-0.4 s of imports) comes at the first VM lock, so a command that locks no VM
(bls, bget, bwhereis) does not pay for it."""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from typing import Any

from cbsd.core.cluster import config, owner
from cbsd.core.cluster.config import Config
from cbsd.core.cluster.nodes import VM as VM_KEY
from cbsd.core.cluster.store import Store
from cbsd.core.vm.context import Context
from cbsd.errors import CbsdError, StateError
from cbsd.names import parse_interval
from cbsd.storage.paths import Workdir


def install_if_node(ctx: Context) -> bool:
    """Put the ownership guard on *ctx* if its workdir is a cluster node (its
    cluster/config.json exists); whether it did."""
    if not ctx.workdir.cluster_config.is_file():
        return False
    install(ctx)
    return True


def check_owned(wd: Workdir, jnames: list[str], what: str) -> None:
    """On a cluster node: NotOwner (owner.refusal, the guard's own message) at once if another
    node owns one of *jnames* -- one read each, nothing written. For the service, which
    answers before its operation starts (409) rather than with the operation's failure a
    moment later; the guard, entered under the VM's lock, still decides. A VM whose move from
    here is unsettled is left to the guard (its recovery runs first, as there)."""
    if not wd.cluster_config.is_file():
        return
    # lazy: the read path (the standard library's HTTPS) only when there is something to ask
    from cbsd.core.cluster import view

    cfg, reader = view.reader(wd)
    for jname in jnames:
        kv = reader.get(VM_KEY + jname)
        rec = kv.json() if kv is not None else {}
        node = rec.get("node")
        if (node not in (None, cfg.node) and not wd.moving(jname).exists()
                and not owner.leftover_removal(rec, cfg.node, what)):
            raise owner.refusal(jname, node, cfg.node, what)


def install(ctx: Context) -> None:
    """Put the ownership guard on *ctx*: every VM lock it takes is held inside
    owner.guarded (core/cluster/owner.py)."""
    made: list[tuple[Config, Store]] = []

    def connected() -> tuple[Config, Store]:
        if not made:
            cfg = config.load(ctx.workdir)
            if cfg is None:  # left the cluster since the check: nothing to guard against
                raise StateError("cluster: this host is no longer a cluster node")
            made.append((cfg, config.store(ctx.workdir, cfg)))
        return made[0]

    def facts(jname: str) -> tuple[bool, dict[str, Any]]:
        # lazy: only after a guarded command, which has loaded the VM's module already
        from cbsd.core.vm.machine import VM

        spec = ctx.inventory.get(jname)
        if spec is None:
            return False, {}
        # Whether its QEMU runs, not the full status: that asks QMP, whose one session the
        # command may still hold (bmigrate's incoming half does, until it ends).
        try:
            status = "On" if VM.load(ctx, jname).alive() else "Off"
        except CbsdError:
            status = "unknown"
        # The standby finds the VMs it stands by for in one range read (docs/cluster.md
        # "Replication"); ha=0 records null.
        ha = ({"node": spec.ha_node, "interval": parse_interval(spec.ha_interval, "ha_interval")}
              if spec.ha and spec.ha_node else None)
        return True, {"ram": spec.ram, "cpus": spec.cpus, "status": status, "ha": ha}

    def guard(jname: str, what: str) -> AbstractContextManager[None]:
        if what in owner.UNGUARDED:
            return contextlib.nullcontext()
        cfg, store = connected()
        return owner.guarded(store, cfg.node, jname, what, lambda: facts(jname),
                             lambda: ctx.workdir.moving(jname).exists())

    ctx.guard = guard
