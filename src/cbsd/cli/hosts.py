"""The commands that reach beyond this host: bexport, bimport, node, bmove, bmigrate, bwhereis
(their work is in core/hosts/: transfer.py, nodes.py, move.py, migrate.py and whereis.py),
bls (of this host, of nodes, or of the whole cluster: core/manage/listing.py,
core/hosts/nodes.py, core/cluster/view.py) and breplica (core/cluster/replica.py)."""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path
from typing import Any

from cbsd.cli import output
from cbsd.cli.commands import Args, only_in_modes
from cbsd.core.vm.context import Context
from cbsd.errors import NodeError, UsageError
from cbsd.failpoints import failpoint
from cbsd.names import check_name, match_mask
from cbsd.storage.atomic import fsync_dir


def bexport(ctx: Context, a: Args) -> int:
    # lazy: each host command loads its own core module
    from cbsd.core.hosts import transfer

    jname, out = a["jname"], a["out"]
    chosen = a["checkpoints"]
    selection = None if chosen == "all" else [] if chosen == "none" else [
        check_name(n.strip(), "checkpoint name") for n in chosen.split(",") if n.strip()]
    if out == "-":
        if sys.stdout.isatty():
            raise UsageError("bexport: out=- would write the archive to a terminal: pipe it "
                             "on, or give out=PATH")
        print(transfer.export(ctx, jname, lambda: sys.stdout.buffer, selection,
                              suspend=a["suspend"]), file=sys.stderr)
        return 0
    path = Path(out).absolute()
    if path.exists():
        raise UsageError(f"bexport: {path} exists (cbsd does not overwrite it)")
    tmp = path.with_name(f".{path.name}.part-{os.getpid()}")
    opened: list[Any] = []

    def create() -> Any:
        try:
            f = open(tmp, "xb")  # noqa: SIM115  (closed below, after the rename decision)
        except OSError as e:
            raise UsageError(f"bexport: cannot create {path}: {e.strerror}") from None
        opened.append(f)
        return f

    try:
        msg = transfer.export(ctx, jname, create, selection, suspend=a["suspend"])
        f = opened[0]
        f.flush()
        os.fsync(f.fileno())
        f.close()
        failpoint("bexport:written")
        _publish_new(tmp, path)
    finally:
        for f in opened:
            f.close()
        tmp.unlink(missing_ok=True)
    print(f"{msg}: {path}")
    return 0


def _publish_new(tmp: Path, path: Path) -> None:
    """Give the finished archive *tmp* its name *path* only if nothing has it: link(2), or
    renameat2(RENAME_NOREPLACE) where the file system has no hard links, fails with EEXIST
    instead of replacing, so a file created at PATH while the export ran (the check at the
    start is only advice) is never overwritten. The caller removes *tmp*."""
    # lazy: ctypes is heavy: only a file system without hard links needs it
    import ctypes

    try:
        os.link(tmp, path)
    except OSError as e:
        err = e.errno
        if err in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
            libc = ctypes.CDLL(None, use_errno=True)
            at_fdcwd, rename_noreplace = -100, 1
            done = libc.renameat2(at_fdcwd, os.fsencode(tmp), at_fdcwd, os.fsencode(path),
                                  rename_noreplace)
            err = 0 if done == 0 else ctypes.get_errno()
        if err == errno.EEXIST:
            raise UsageError(f"bexport: {path} was created while the export ran (cbsd does "
                             "not overwrite it): nothing was written") from None
        if err:
            raise OSError(err, os.strerror(err), str(path)) from None
    fsync_dir(path.parent)


def bimport(ctx: Context, a: Args) -> int:
    # lazy: each host command loads its own core module
    from cbsd.core.hosts import transfer

    mode = a["mode"]
    names = a.get("names") or []
    if len(names) > 1:
        raise UsageError("bimport: takes one jname=")
    new = check_name(names[0]) if names else None
    if mode in ("commit", "abort"):
        if not a["id"]:
            raise UsageError(f"bimport: mode={mode} needs id=")
        if mode == "commit":
            print(f"{transfer.commit(ctx, a['id'])}: imported")
        else:
            print(transfer.abort(ctx, a["id"]))
        return 0
    if not a["in"]:
        raise UsageError("bimport: missing required key 'in' (a path, or - for stdin)")
    if a["in"] == "-":
        if sys.stdin.isatty():
            raise UsageError("bimport: in=- reads the archive from stdin: pipe it in")
        jname, ident = transfer.import_(ctx, sys.stdin.buffer, new, stage=mode == "stage")
    else:
        try:
            f = open(a["in"], "rb")  # noqa: SIM115
        except OSError as e:
            raise UsageError(f"bimport: cannot read {a['in']}: {e.strerror}") from None
        with f:
            jname, ident = transfer.import_(ctx, f, new, stage=mode == "stage")
    print(ident if mode == "stage" else f"{jname}: imported")
    return 0


def node(ctx: Context, a: Args) -> int:
    # lazy: each host command loads its own core module
    from cbsd.core.hosts import nodes

    mode = a["mode"]
    only_in_modes(a, mode, {"host": ("add",), "port": ("add",), "format": ("list",)},
          {"host": None, "port": 22, "format": "text"}, "node")
    if mode == "list":
        rows = nodes.listing(ctx)
        if a["format"] == "json":
            sys.stdout.write(output.as_json(rows))
        else:
            sys.stdout.write(output.table(rows, ["name", "host", "port"], True))
        return 0
    if not a["name"]:
        raise UsageError(f"node: mode={mode} needs name=")
    if mode == "add":
        if not a["host"]:
            raise UsageError("node: mode=add needs host=[USER@]ADDRESS")
        print(nodes.add(ctx, a["name"], a["host"], a["port"]))
    else:
        print(nodes.remove(ctx, a["name"]))
    return 0


def bcluster(ctx: Context, a: Args) -> int:
    # lazy: only bcluster loads the cluster's administration
    from cbsd.core.cluster import admin

    mode = a["mode"]
    only_in_modes(a, mode, {"name": ("init", "issue", "join"),
                            "address": ("init", "issue", "join"), "bundle": ("join",),
                            "out": ("issue",), "member": ("join",), "ttl": ("init",),
                            "format": ("status",), "watchdog": ("init", "join", "start")},
                  {"name": None, "address": None, "bundle": None, "out": None, "member": True,
                   "ttl": 10, "format": "text", "watchdog": None}, "bcluster")
    for key, modes in (("name", ("init", "issue", "join")), ("address", ("init", "issue",
                       "join")), ("bundle", ("join",)), ("out", ("issue",))):
        if mode in modes and not a[key]:
            raise UsageError(f"bcluster: mode={mode} needs {key}=")
    if mode == "status":
        rows = admin.status(ctx)
        if a["format"] == "json":
            sys.stdout.write(output.as_json(rows))
        else:
            sys.stdout.write(output.table(rows, list(STATUS_COLUMNS), True))
        return 0
    if mode == "init":
        print(admin.init(ctx, a["name"], a["address"], a["ttl"], a["watchdog"] or ""))
    elif mode == "issue":
        print(admin.issue(ctx, a["name"], a["address"], a["out"]))
    elif mode == "join":
        print(admin.join(ctx, a["name"], a["address"], a["bundle"], a["member"],
                         a["watchdog"] or ""))
    elif mode == "start":
        print(admin.start(ctx, a["watchdog"]))
    else:
        print(admin.leave(ctx))
    return 0


STATUS_COLUMNS = ("node", "state", "address", "cpus", "mem_total", "mem_free", "qemu", "accel",
                  "vms")


def bmove(ctx: Context, a: Args) -> int:
    # lazy: each host command loads its own core module
    from cbsd.core.hosts import move

    print(move.move(ctx, a["jname"], a["node"]))
    return 0


def bmigrate(ctx: Context, a: Args) -> int:
    # lazy: each host command loads its own core module
    from cbsd.core.hosts import migrate, migrate_in

    jname, mode = a["jname"], a["mode"]
    if mode == "incoming":
        return migrate_in.main_incoming(ctx, jname)
    if mode == "status":
        print(migrate_in.status(ctx, jname))
        return 0
    if not a["node"]:
        raise UsageError("bmigrate: missing required key 'node'")
    print(migrate.migrate(ctx, jname, a["node"]))
    return 0


def bwhereis(ctx: Context, a: Args) -> int:
    # lazy: each command loads its own core module
    from cbsd.core.hosts import whereis

    found = whereis.whereis(ctx, a["jname"])
    for err in found.unreached:  # found elsewhere: a node that did not answer is named
        print(err, file=sys.stderr)
    print("\n".join(found.hosts))
    return 0


def bls(ctx: Context, a: Args) -> int:
    unreached = 0
    if a["node"] == "*" and ctx.workdir.cluster_config.is_file():
        # before the local listing's module: the cluster's listing needs none of it
        rows, columns = _cluster_rows(ctx, a)
        return _print_rows(rows, columns, a, unreached)
    # lazy: only bls of this host or of the nodes
    from cbsd.core.manage import listing

    columns = a["display"] or list(listing.COLUMNS)
    if a["node"]:
        rows, unreached = _across_nodes(ctx, a, columns)
    else:
        names = ctx.resolve(a["names"]) if a["names"] else None
        rows, notes, damaged = listing.rows(ctx, names)
        for note in notes + damaged:
            print(note, file=sys.stderr)
        unreached = len(damaged)  # listed the others; exit 1 names what was not
    return _print_rows(rows, columns, a, unreached)


def _print_rows(rows: list[dict[str, Any]], columns: list[str], a: Args,
                unreached: int) -> int:
    """bls's rows in its order= and format=; exit 1 if *unreached* (VMs or nodes) is not 0."""
    order = a["order"]
    column = order.lstrip("-")
    rows.sort(key=lambda r: (r.get(column) or 0, r["jname"], r.get("node", "")),
              reverse=order.startswith("-"))
    if a["format"] == "json":
        sys.stdout.write(output.as_json([{c: r[c] for c in columns} for r in rows]))
    else:
        sys.stdout.write(output.table(rows, columns, a["header"]))
    return 1 if unreached else 0


CLUSTER_COLUMNS = ("node", "jname", "status", "vm_ram", "vm_cpus", "node_state")


def _cluster_rows(ctx: Context, a: Args) -> tuple[list[dict[str, Any]], list[str]]:
    """bls node='*' on a cluster node: every clustered VM from etcd's owner records, in one
    range read -- the owner, whether that node is up, the status its last command left."""
    # lazy: only a cluster node's bls node='*'
    from cbsd.core.cluster import view

    columns = list(a["display"] or CLUSTER_COLUMNS)
    other = [c for c in columns if c not in CLUSTER_COLUMNS]
    if other:
        raise UsageError(f"bls: node='*' on a cluster node shows {','.join(CLUSTER_COLUMNS)} "
                         f"(from etcd), not {','.join(other)}")
    rows = view.vm_rows(ctx.workdir)
    if a["names"]:
        keep = {n for m in a["names"] for n in match_mask(m, [r["jname"] for r in rows])}
        rows = [r for r in rows if r["jname"] in keep]
    return rows, columns


def _across_nodes(ctx: Context, a: Args, columns: list[str]
                  ) -> tuple[list[dict[str, Any]], int]:
    """bls node=N|'*': each node's own `bls format=json`, with a node column ('*' adds this
    host's VMs as node 'local'). A node that cannot be reached, does not answer in time or
    answers what is not a listing is named on stderr; the command then exits 1 after listing
    the others."""
    # lazy: only bls node=: the ssh fan-out
    from cbsd.core.hosts import nodes

    # lazy: only bls
    from cbsd.core.manage import listing

    want = [n for n, _, _ in ctx.inventory.nodes()] if a["node"] == "*" else [a["node"]]
    rows: list[dict[str, Any]] = []
    unreached = 0
    if a["node"] == "*":
        local, notes, damaged = listing.rows(ctx, ctx.resolve(a["names"]) if a["names"]
                                             else None)
        for note in notes + damaged:
            print(note, file=sys.stderr)
        rows += [{**r, "node": "local"} for r in local]
        unreached += len(damaged)
    for name, found in nodes.vm_rows(ctx, want, a["names"]):  # validated, each in a deadline
        if isinstance(found, NodeError):
            if a["node"] != "*":
                raise found
            print(found, file=sys.stderr)  # one line per node left out; the others listed
            unreached += 1
            continue
        rows += [{**r, "node": name} for r in found]
    if "node" not in columns:
        columns.insert(0, "node")
    return rows, unreached


def breplica(ctx: Context, a: Args) -> int:
    """The standby's half of replication (core/cluster/replica.py)."""
    # lazy: only replication loads the cluster's code
    from cbsd.core.cluster import replica

    jname, mode = a["jname"], a["mode"]
    if mode == "status":
        sys.stdout.write(output.as_json(replica.status(ctx.workdir, jname)))
    elif mode == "apply":
        sys.stdout.write(output.as_json(replica.apply(ctx, jname, sys.stdin.buffer)))
    elif mode == "remove":
        print(replica.remove(ctx.workdir, jname))
    else:
        print(replica.promote(ctx, jname))
    return 0
