"""/1.0/instances/{name}/disks (bhyve-dsk) and /1.0/instances/{name}/clone (bclone)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Request
from fastapi.responses import JSONResponse

from cbsd.core.manage import disks, settings
from cbsd.service.api_state import check_not_busy
from cbsd.service.common import context, keys, started

router = APIRouter(prefix="/1.0/instances/{name}", tags=["disks", "clone"])

Json = Annotated[dict[str, Any], Body()]


@router.get("/disks", summary="The VM's disks (bhyve-dsk mode=list)")
def listing(request: Request, name: str) -> list[dict[str, Any]]:
    with context(request) as ctx:
        return disks.listing(ctx, name)


@router.post("/disks", status_code=201, summary="Attach a new disk to a stopped VM "
             "(bhyve-dsk mode=attach keys: dsk_size, dsk_controller, dsk_name)")
def attach(request: Request, name: str, body: Json) -> dict[str, Any]:
    a = keys(request, "bhyve-dsk", {**body, "jname": name, "mode": "attach"})
    with context(request, writable=True) as ctx:
        done = disks.attach(ctx, name, a["dsk_size"], a["dsk_controller"], a["dsk_name"])
        return {"result": done, "disks": disks.listing(ctx, name)}


@router.delete("/disks/{disk}", summary="Detach a stopped VM's disk (its image stays)")
def detach(request: Request, name: str, disk: str) -> dict[str, Any]:
    a = keys(request, "bhyve-dsk", {"jname": name, "mode": "detach", "dsk_name": disk})
    with context(request, writable=True) as ctx:
        done = disks.detach(ctx, name, a["dsk_name"])
        return {"result": done, "disks": disks.listing(ctx, name)}


@router.post("/clone", status_code=202, summary="Copy a stopped VM (bclone keys: new, "
             "checkpoint); an operation")
def clone(request: Request, name: str, body: Json) -> JSONResponse:
    a = keys(request, "bclone", {**body, "old": name})
    with context(request) as ctx:
        ctx.spec(name)
        check_not_busy(ctx, name)
    return started(request, f"clone {name} {a['new']}", [name, a["new"]],
                   lambda ctx, _: settings.clone(ctx, name, a["new"], a["checkpoint"]),
                   command="bclone")
