"""/1.0/instances: list, show, create, delete, settings (bls, bget, bcreate, bremove, bset)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Request
from fastapi.responses import JSONResponse

from cbsd.core.checkpoint import checkpoints
from cbsd.core.manage import lifecycle, listing, settings
from cbsd.core.vm.context import Context
from cbsd.errors import UsageError
from cbsd.service import pools
from cbsd.service.common import context, keys, started
from cbsd.service.operations import Progress

router = APIRouter(prefix="/1.0/instances", tags=["instances"])


@router.get("", summary="Every VM of this host: bls's columns and its checkpoint count")
def instances(request: Request) -> list[dict[str, Any]]:
    with context(request) as ctx:
        # Each VM's row derived again only if it may have changed (service/rowcache.py).
        rows, _, damaged = request.app.state.rows.rows(ctx)
    # A damaged entry is not listed (as bls): it is named in the list of problems instead.
    return [*rows, *({"damaged": d} for d in damaged)]


@router.get("/{name}", summary="One VM: its bls row, settings and checkpoint count")
def instance(request: Request, name: str) -> dict[str, Any]:
    with context(request) as ctx:
        ctx.spec(name)  # 404 for a VM that does not exist
        rows, _, _ = listing.rows(ctx, [name])
        return {**rows[0], "config": settings.get(ctx, name),
                "checkpoints": len(checkpoints.listing(ctx, name))}


@router.post("", status_code=202, summary="Create a VM (bcreate's keys as JSON; an operation)")
def create(request: Request, body: Annotated[dict[str, Any], Body()]) -> JSONResponse:
    a = keys(request, "bcreate", body)
    cfg = request.app.state.config
    a = pools.confine(cfg.pools, cfg.workdir, a)
    jname = a.get("jname")
    if not jname:
        raise UsageError("bcreate: missing required key 'jname'")

    def work(ctx: Context, progress: Progress) -> str:
        lifecycle.create_from_keys(ctx, a)
        return f"{jname}: created" + (f"; {lifecycle.start(ctx, jname)}" if a["runasap"]
                                      else "")

    return started(request, f"create {jname}", [jname], work, command="bcreate")


@router.delete("/{name}", summary="Delete a VM with its disks and checkpoints (bremove)")
def delete(request: Request, name: str) -> JSONResponse:
    with context(request) as ctx:
        ctx.spec(name)
    return started(request, f"remove {name}", [name],
                   lambda ctx, _: lifecycle.remove(ctx, name), command="bremove")


@router.get("/{name}/config", summary="A VM's settings (bget)")
def config(request: Request, name: str) -> dict[str, Any]:
    with context(request) as ctx:
        return settings.get(ctx, name)


@router.patch("/{name}/config", summary="Change a stopped VM's settings (bset's keys)")
def set_config(request: Request, name: str,
               body: Annotated[dict[str, Any], Body()]) -> dict[str, Any]:
    a = keys(request, "bset", {**body, "jname": name})
    cfg = request.app.state.config
    changes = pools.confine(cfg.pools, cfg.workdir, {
        k: v for k, v in a.items() if k in settings.SETTABLE and v is not None}, "bset")
    with context(request, writable=True) as ctx:
        return {"result": settings.set_(ctx, name, changes), "config": settings.get(ctx, name)}
