"""The checkpoint tree: which checkpoint each saved state descends from.

A running VM descends from the checkpoint it was last restored from or taken after; that name is
kept in jails-system/<jname>/current while the VM runs (a cold start clears it, a hibernation
image carries it across the VM's time off). Each new state records it as its `parent`.

Checkpoints are self-contained (their own memory file, their own disk snapshots), so deleting
one never makes another unrestorable; the tree only records history. Deleting one gives its
children its own parent, as `virsh snapshot-delete` does.

The pure functions (render, beyond_keep) are tested as tables; the rest is their I/O.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

from cbsd.errors import CheckpointError
from cbsd.storage import ckpstore
from cbsd.storage.atomic import write_atomic
from cbsd.storage.paths import Workdir


def current(wd: Workdir, jname: str) -> str | None:
    try:
        return wd.current_checkpoint(jname).read_text().strip() or None
    except (FileNotFoundError, NotADirectoryError):
        return None


def set_current(wd: Workdir, jname: str, name: str | None) -> None:
    path = wd.current_checkpoint(jname)
    if name is None:
        path.unlink(missing_ok=True)
    else:
        write_atomic(path, f"{name}\n".encode())


def parent_for(wd: Workdir, jname: str, name: str, kind: str) -> str | None:
    """The parent a new state named *name* records. A checkpoint taken again under the name the
    VM descends from replaces that one, so it takes over the replaced one's parent."""
    parent = current(wd, jname)
    if kind == "checkpoint" and parent == name:
        with contextlib.suppress(CheckpointError):  # damaged or gone: no parent to take over
            return ckpstore.read_manifest(wd.checkpoint(jname, name)).parent
        return None
    return parent


def reparent(wd: Workdir, jname: str, gone: str, new_parent: str | None) -> None:
    """Checkpoint *gone* is being deleted or replaced: its children (and the running VM, if it
    descends from it) now descend from *new_parent*. Each child's manifest is sealed again and
    rewritten atomically; a damaged one is left as it is (verify reports it)."""
    for path, m in ckpstore.list_states(wd.checkpoints(jname)):
        if m is not None and m.parent == gone and ckpstore.state_name(path) != gone:
            m.parent = new_parent
            ckpstore.save_manifest(m, path)
    hibernation = wd.hibernation(jname)
    if ckpstore.has_manifest(hibernation):
        with contextlib.suppress(Exception):
            m = ckpstore.read_manifest(hibernation)
            if m.parent == gone:
                m.parent = new_parent
                ckpstore.save_manifest(m, hibernation)
    if current(wd, jname) == gone:
        set_current(wd, jname, new_parent)


def render(states: Sequence[tuple[str, str | None, str]], here: str | None) -> list[str]:
    """The tree as text lines, children under their parent, each level oldest first.
    *states*: (name, parent, note) oldest first; a parent not among them counts as a root.
    *here*: the checkpoint the running VM descends from, marked with '*'."""
    names = {name for name, _, _ in states}
    children: dict[str | None, list[tuple[str, str]]] = {}
    for name, parent, note in states:
        key = parent if parent in names and parent != name else None
        children.setdefault(key, []).append((name, note))
    lines: list[str] = []
    shown: set[str] = set()

    def walk(parent: str | None, prefix: str, seen: frozenset[str]) -> None:
        kids = children.get(parent, [])
        for i, (name, note) in enumerate(kids):
            last = i == len(kids) - 1
            branch = "" if parent is None else ("└─ " if last else "├─ ")
            mark = " *" if name == here else ""
            lines.append(f"  {prefix}{branch}{name}{mark}{note}")
            shown.add(name)
            if name not in seen:  # a cycle (hand-made manifests) is shown once, not forever
                deeper = prefix if parent is None else prefix + ("   " if last else "│  ")
                walk(name, deeper, seen | {name})

    walk(None, "", frozenset())
    for name, _, note in states:  # members of a cycle with no root: list them flat
        if name not in shown:
            lines.append(f"  {name}{' *' if name == here else ''}{note}")
    return lines


def beyond_keep(names_oldest_first: Sequence[str], keep: int, new: str) -> list[str]:
    """Which checkpoints retention removes so that *keep* remain: the oldest, never *new*."""
    others = [n for n in names_oldest_first if n != new]
    excess = len(others) + 1 - keep
    return others[:max(0, excess)]
