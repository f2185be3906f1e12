"""The commands that reach beyond this host: bexport, bimport, node, bmove, bmigrate, bwhereis
(their work is in core/hosts/: transfer.py, nodes.py, move.py, migrate.py and whereis.py)."""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path
from typing import Any

from cbsd.cli import output
from cbsd.cli.commands import Args, only_in_modes
from cbsd.core.vm.context import Context
from cbsd.errors import UsageError
from cbsd.failpoints import failpoint
from cbsd.names import check_name
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
