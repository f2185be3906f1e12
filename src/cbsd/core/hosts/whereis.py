"""bwhereis: which host has a VM -- this one ('local') or the nodes that list it.

As CBSD's bwhereis (jwhereis emulator=bhyve), the answer is a node name per line; this host
is 'local', the name `bls node='*'` gives it. Its own inventory is read first and the nodes
are asked only when it does not list the VM: bmove and bmigrate keep a VM registered on
exactly one host at every instant, and a local answer then needs no network.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cbsd.core.cluster import config, view
from cbsd.core.vm.context import Context
from cbsd.errors import CbsdError, NodeError
from cbsd.names import check_name


@dataclass
class Found:
    hosts: list[str]  # 'local', or the nodes that list the VM, in the order they are known
    unreached: list[NodeError] = field(default_factory=list)  # nodes that gave no answer


def whereis(ctx: Context, jname: str) -> Found:
    """Where *jname* is registered; CbsdError (exit 1, one line) if no host answered that
    it has it."""
    check_name(jname)
    if config.configured(ctx.workdir):
        return _from_etcd(ctx, jname)
    if jname in ctx.inventory.names():
        return Found(["local"])
    # lazy: the SSH fan-out (and the VM modules it stands on) only where no cluster answers
    from cbsd.core.hosts import nodes

    known = [n for n, _, _ in ctx.inventory.nodes()]
    found = Found([])
    # Each node's whole listing (validated, in parallel, each within its deadline): a VM a
    # node lacks is then an answer, not a failed `bls jname=` to tell from a fault.
    for name, rows in nodes.vm_rows(ctx, known, []):
        if isinstance(rows, NodeError):
            found.unreached.append(rows)
        elif any(r["jname"] == jname for r in rows):
            found.hosts.append(name)
    if found.hosts:
        return found
    where = "this host" + (" or any node" if known else " (and no nodes: see 'cbsd node')")
    if found.unreached:
        more = len(found.unreached) - 1
        where += f" that answered ({found.unreached[0]}" + (f"; {more} more" if more else "")
        where += ")"
    hint = (f"; its files are here but unregistered: 'cbsd bregister jname={jname}'"
            if ctx.workdir.spec_file(jname).exists() else "")
    raise CbsdError(f"{jname}: not found on {where}{hint}")


def _from_etcd(ctx: Context, jname: str) -> Found:
    """A cluster node answers from the VM's owner record (one read): 'local' if this node
    owns it, else the owner's name; an owner that is down is said on stderr."""
    found = view.owner_of(ctx.workdir, jname)
    if found is None:
        raise CbsdError(f"{jname}: no node of the cluster owns a VM by that name")
    node, up, me = found
    if not up:
        found_down = NodeError(f"{jname}: its owner, node {node}, is down (its lease lapsed)")
        return Found([node], [found_down])
    return Found(["local" if node == me else node])
