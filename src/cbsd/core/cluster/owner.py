"""Every clustered VM has one owner record, /cbsd/vm/NAME = {"node": OWNER, ...}. A command
that changes a VM (anything that takes its lock: Context.lock) first records itself in that
record in one etcd transaction that compares the record's mod revision with the one it read
saying this node owns it; if another node owns it, or the record changed in between, nothing
is done. A VM nobody owns yet is claimed the same way (compare: the key does not exist).
After the command the record gets the VM's size and status (free-memory accounting, bls).

bmove/bmigrate hand a VM over with one compare-and-swap (switch()): the record names the
target and says "from": the source. The target's command that registers the VM may run on
that record; once the VM is in the target's inventory, its guard drops "from" (taken up).
Until then the source may take the record back (take_back(), or its guard after recovery
settled a move cut short): the source does so only once the VM is known to stay with it."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from cbsd.core.cluster.nodes import VM
from cbsd.core.cluster.store import KV, Compare, Delete, Put, Store
from cbsd.errors import BusyError, StateError

# Commands whose lock is not a change to an owned VM: the target's half of a bmigrate
# answering whether it holds the VM, and clearing a half-received one it never registered
# (the source's recovery asks it after the record came back to the source).
UNGUARDED = {"bmigrate status"}


class NotOwner(StateError):
    """Another node owns the VM: this node changes nothing of it."""


def refusal(jname: str, node: object, me: str, what: str) -> NotOwner:
    """The refusal of *what* on a VM node *node* owns, as every caller says it (the guard,
    and the service's check before it starts an operation)."""
    return NotOwner(f"{jname}: owned by node {node} in the cluster, not by this node ({me}): "
                    f"{what} refused")


def _record(kv: KV | None) -> dict[str, Any]:
    return kv.json() if kv is not None else {}


def _mine(rec: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in rec.items() if k != "from"}


def leftover_removal(rec: dict[str, Any], me: str, what: str) -> bool:
    """Whether *what* is the bremove of the copy a takeover left on this node (the record
    names the standby that took the VM from here): the one command that copy may run."""
    return what == "bremove" and rec.get("taken_from") == me


def claim_or_check(store: Store, me: str, jname: str, what: str, *,
                   handing_over: bool = False) -> bool:
    """Record *what* in the VM's owner record iff this node owns it (or nobody does: then
    this node claims it). *handing_over*: this node has an unsettled move of the VM (its
    intent file): the command runs without writing anything, whoever the record names --
    its recovery settles the move first, by asking the target (which has the VM only if it
    committed: then recovery removes the copy here, and the record stays the target's; if
    not, settle() takes a record still saying "from": this node back). Whether this node
    owns it now; NotOwner / BusyError when the command may not run."""
    kv = store.get(VM + jname)
    rec = _record(kv)
    if kv is not None and rec.get("node") != me:
        if handing_over:
            return False
        if leftover_removal(rec, me, what):
            return False  # the copy a takeover left here: removing it is all it may do
        raise refusal(jname, rec.get("node"), me, what)
    new = {**rec, "node": me, "last": what, "time": time.time()}
    if not store.txn([Compare(VM + jname, kv.mod_revision if kv else 0)],
                     [Put(VM + jname, json.dumps(new).encode())]):
        raise BusyError(f"{jname}: its owner record changed while {what} checked it: "
                        "try again")
    return True


def settle(store: Store, me: str, jname: str, what: str, *, exists: bool,
           facts: dict[str, Any], settled: bool = True) -> None:
    """After the command. A record naming this node takes the VM's facts (and loses "from":
    the VM is here, taken up), or goes when the VM is no more in this node's inventory
    (bremove, bunregister, brename's old name, a failed bcreate or incoming move). A record
    this node handed over comes back if the VM is still here and its move is *settled* (no
    intent left). A VM here that nobody owns is claimed. Any other record is left alone."""
    kv = store.get(VM + jname)
    rec = _record(kv)
    if kv is None:
        if exists:
            store.txn([Compare(VM + jname, 0)], [Put(VM + jname, json.dumps(
                {"node": me, "last": what, "time": time.time(), **facts}).encode())])
        return
    guard = [Compare(VM + jname, kv.mod_revision)]
    if rec.get("node") == me:
        if exists:
            store.txn(guard, [Put(VM + jname, json.dumps({**_mine(rec), **facts}).encode())])
        else:
            store.txn(guard, [Delete(VM + jname)])
    elif rec.get("from") == me and exists and settled:
        back = {**_mine(rec), **facts, "node": me, "last": "handover undone",
                "time": time.time()}
        store.txn(guard, [Put(VM + jname, json.dumps(back).encode())])


def switch(store: Store, me: str, jname: str, to: str) -> None:
    """The switchover of bmove/bmigrate: one compare-and-swap of the owner, from this node
    to *to*, valid only on the record this node owns as read (NotOwner otherwise)."""
    kv = store.get(VM + jname)
    rec = _record(kv)
    if kv is None or rec.get("node") != me:
        raise NotOwner(f"{jname}: not owned by this node ({me}) in the cluster: "
                       f"cannot hand it to {to}")
    new = {**rec, "node": to, "from": me, "last": f"moved from {me}", "time": time.time()}
    if not store.txn([Compare(VM + jname, kv.mod_revision)],
                     [Put(VM + jname, json.dumps(new).encode())]):
        raise BusyError(f"{jname}: its owner record changed during the switchover: the VM "
                        "stays here")


def take_back(store: Store, me: str, jname: str) -> None:
    """Undo switch() once the VM is known to stay here (the target dropped it, or never got
    it): the record comes back by compare-and-swap if the target has not taken it up (it
    still says "from": this node), or if nobody owns it now."""
    settle(store, me, jname, "handover undone", exists=True, facts={})


@contextmanager
def guarded(store: Store, me: str, jname: str, what: str,
            facts: Callable[[], tuple[bool, dict[str, Any]]],
            moving: Callable[[], bool] = lambda: False) -> Iterator[None]:
    """The guard Context.lock runs a VM's command in (cli installs it when clustered).
    *facts*: () -> (the VM is in this node's inventory, facts to record) after the command;
    *moving*: () -> whether a move of the VM from here is unsettled (its intent file)."""
    claim_or_check(store, me, jname, what, handing_over=moving())
    try:
        yield
    finally:
        exists, info = facts()
        settle(store, me, jname, what, exists=exists, facts=info, settled=not moving())
