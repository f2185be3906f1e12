"""The handlers of a VM's devices: bhyve-dsk (disks) and bhyve-nic (NICs)."""

from __future__ import annotations

import sys

from cbsd.cli import output
from cbsd.cli.commands import Args, only_in_modes
from cbsd.core.vm.context import Context
from cbsd.errors import UsageError


def bhyve_dsk(ctx: Context, a: Args) -> int:
    # lazy: only bhyve-dsk
    from cbsd.core.manage import disks

    mode, jname = a["mode"], a["jname"]
    only_in_modes(a, mode, {"dsk_size": ("attach",), "dsk_controller": ("attach",),
                    "dsk_name": ("attach", "detach"), "format": ("list",)},
          {"dsk_size": None, "dsk_controller": None, "dsk_name": None, "format": "text"},
          "bhyve-dsk")
    if mode == "list":
        rows = disks.listing(ctx, jname)
        if a["format"] == "json":
            sys.stdout.write(output.as_json(rows))
        else:
            sys.stdout.write(output.table(rows, ["dsk_name", "dsk_size", "dsk_controller"],
                                          True))
        return 0
    if mode == "attach":
        print(disks.attach(ctx, jname, a["dsk_size"], a["dsk_controller"], a["dsk_name"]))
        return 0
    if not a["dsk_name"]:
        raise UsageError("bhyve-dsk: mode=detach needs dsk_name= (see mode=list)")
    print(disks.detach(ctx, jname, a["dsk_name"]))
    return 0


NIC_COLUMNS = ["nic_id", "nic_type", "nic_parent", "nic_hwaddr", "nic_driver", "hostfwd",
               "ip4_addr"]


def bhyve_nic(ctx: Context, a: Args) -> int:
    # lazy: only bhyve-nic
    from cbsd.core.manage import nics

    mode, jname = a["mode"], a["jname"]
    only_in_modes(a, mode, {"nic_type": ("attach",), "nic_parent": ("attach",),
                            "nic_hwaddr": ("attach", "detach"), "hostfwd": ("attach",),
                            "nic_id": ("detach",), "format": ("list",)},
                  {"nic_type": "bridge", "nic_parent": None, "nic_hwaddr": None,
                   "hostfwd": [], "nic_id": None, "format": "text"}, "bhyve-nic")
    if mode == "list":
        rows = nics.listing(ctx, jname)
        if a["format"] == "json":
            sys.stdout.write(output.as_json(rows))
        else:
            shown = [{**r, "hostfwd": ",".join(r["hostfwd"]) or "-",
                      **{k: r[k] or "-" for k in ("nic_parent", "nic_hwaddr", "ip4_addr")}}
                     for r in rows]
            sys.stdout.write(output.table(shown, NIC_COLUMNS, True))
        return 0
    if mode == "attach":
        print(nics.attach(ctx, jname, a["nic_type"], a["nic_parent"], a["nic_hwaddr"],
                          a["hostfwd"]))
        return 0
    print(nics.detach(ctx, jname, a["nic_id"], a["nic_hwaddr"]))
    return 0
