"""/1.0/instances/{name}/checkpoints: the tree, create, destroy, verify, restore -- the calls
`bcheckpoint` and `bstart checkpoint=` make."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from cbsd.core.checkpoint import checkpoints, tree
from cbsd.core.manage import lifecycle
from cbsd.core.vm.context import Context
from cbsd.errors import NoSuchVM
from cbsd.names import check_name
from cbsd.service.api_state import check_not_busy
from cbsd.service.common import context, started
from cbsd.service.operations import Progress

router = APIRouter(prefix="/1.0/instances/{name}/checkpoints", tags=["checkpoints"])


class NewCheckpoint(BaseModel):
    name: str = Field("checkpoint", description="the checkpoint's name")
    live: bool = Field(False, description="keep the guest running while its memory is written")
    poweroff: bool = Field(False, description="power the VM off once it is safely on disk")
    keep: int | None = Field(None, ge=1, le=100000, description="then delete the oldest so "
                             "that this many remain")


class Restore(BaseModel):
    paused: bool = Field(False, description="leave the VM paused after the restore")


def as_tree(ctx: Context, jname: str) -> dict[str, Any]:
    """bcheckpoint mode=list's facts, each with its children, and the roots of the tree."""
    listed = checkpoints.listing(ctx, jname)
    names = {ck["name"] for ck in listed}
    for ck in listed:
        ck["children"] = [c["name"] for c in listed if c.get("parent") == ck["name"]]
    return {"checkpoints": listed, "current": tree.current(ctx.workdir, jname),
            "roots": [ck["name"] for ck in listed if ck.get("parent") not in names]}


def existing(ctx: Context, jname: str, cp: str) -> None:
    """404 for a checkpoint that does not exist, in the CLI's words (before an operation)."""
    check_name(cp, "checkpoint name")
    ctx.spec(jname)
    path = ctx.workdir.checkpoint(jname, cp)
    if not path.is_dir() or path.is_symlink():
        raise NoSuchVM(f"{jname}: no checkpoint {cp}")


@router.get("", summary="The VM's checkpoints as a tree (parent, children, created, size)")
def listing(request: Request, name: str) -> dict[str, Any]:
    with context(request) as ctx:
        return as_tree(ctx, name)


@router.post("", status_code=202, summary="Create a checkpoint (an operation, with progress)")
def create(request: Request, name: str, body: NewCheckpoint) -> JSONResponse:
    check_name(body.name, "checkpoint name")
    with context(request) as ctx:
        ctx.spec(name)
        check_not_busy(ctx, name)

    def work(ctx: Context, progress: Progress) -> str:
        return checkpoints.create(ctx, name, body.name, poweroff=body.poweroff,
                                  live=body.live, keep=body.keep, progress=progress)

    return started(request, f"checkpoint {name} {body.name}", [name], work,
                   command="bcheckpoint create")


@router.delete("/{cp}", status_code=202, summary="Destroy a checkpoint (an operation)")
def destroy(request: Request, name: str, cp: str) -> JSONResponse:
    with context(request) as ctx:
        existing(ctx, name, cp)
        check_not_busy(ctx, name)
    return started(request, f"destroy checkpoint {name} {cp}", [name],
                   lambda ctx, _: checkpoints.destroy(ctx, name, cp),
                   command="bcheckpoint destroy")


@router.post("/{cp}/verify", status_code=202,
             summary="Verify a checkpoint (an operation; the VM stays usable meanwhile)")
def verify(request: Request, name: str, cp: str) -> JSONResponse:
    with context(request) as ctx:
        existing(ctx, name, cp)

    def work(ctx: Context, progress: Progress) -> dict[str, Any]:
        (ck, problem), = checkpoints.verify(ctx, name, cp)
        return {"checkpoint": ck, "ok": problem is None, "problem": problem}

    # A verify takes no lock (as the CLI's): it does not make the VM busy for others.
    return started(request, f"verify checkpoint {name} {cp}", [], work,
                   command="bcheckpoint verify")


@router.post("/{cp}/restore", status_code=202,
             summary="Restore the VM to a checkpoint (bstart checkpoint=; an operation)")
def restore(request: Request, name: str, cp: str, body: Restore | None = None) -> JSONResponse:
    paused = body.paused if body else False
    with context(request) as ctx:
        existing(ctx, name, cp)
        check_not_busy(ctx, name)
    return started(request, f"restore {name} {cp}", [name],
                   lambda ctx, _: lifecycle.start(ctx, name, checkpoint=cp, paused=paused),
                   command="bstart")
