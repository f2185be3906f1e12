"""bsnapshot's handler: disk-only snapshots (core/manage/snapshots.py)."""

from __future__ import annotations

import sys
from typing import Any

from cbsd.cli import output
from cbsd.cli.commands import each, only_in_modes
from cbsd.core.vm.context import Context
from cbsd.errors import UsageError

Args = dict[str, Any]
COLUMNS = ["jname", "snapname", "created", "disks"]


def bsnapshot(ctx: Context, a: Args) -> int:
    # lazy: only bsnapshot loads its core module
    from cbsd.core.manage import snapshots

    mode, name = a["mode"], a["name"]
    only_in_modes(a, mode, {"name": ("create", "destroy", "rollback"), "header": ("list",),
                            "format": ("list",)},
                  {"name": None, "header": True, "format": "text"}, "bsnapshot")
    vms = ctx.resolve(a["names"])
    if mode == "list":
        rows = [r for j in vms for r in snapshots.listing(ctx, j)]
        if a["format"] == "json":
            sys.stdout.write(output.as_json(rows))
        else:
            sys.stdout.write(output.table([{**r, "disks": ",".join(r["disks"])} for r in rows],
                                          COLUMNS, a["header"]))
        return 0
    if mode == "create":
        snap = snapshots.default_name() if name in (None, "gettimeofday") else name
        return each(ctx, vms, lambda c, j: snapshots.create(c, j, snap))
    if mode == "destroyall":
        return each(ctx, vms, snapshots.destroyall)
    if not name:
        raise UsageError(f"bsnapshot: mode={mode} needs name= (see 'cbsd bsnapshot mode=list')")
    fn = snapshots.destroy if mode == "destroy" else snapshots.rollback
    return each(ctx, vms, lambda c, j: fn(c, j, name))
