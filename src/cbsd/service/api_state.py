"""PUT /1.0/instances/{name}/state: start, stop, restart, pause, resume, hibernate -- each an
operation calling what bstart, bstop, brestart, bpause and bsuspend call."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from cbsd.core.checkpoint import hibernate
from cbsd.core.manage import lifecycle
from cbsd.core.vm.context import Context
from cbsd.core.vm.lock import is_held
from cbsd.errors import BusyError
from cbsd.service.common import context, started
from cbsd.service.operations import Progress

router = APIRouter(prefix="/1.0/instances", tags=["state"])


class StateChange(BaseModel):
    action: Literal["start", "stop", "restart", "pause", "resume", "hibernate"]
    checkpoint: str | None = Field(None, description="start: restore this checkpoint")
    paused: bool = Field(False, description="start: leave the VM paused")
    noacpi: bool = Field(False, description="stop, restart: power off at once")
    hard_timeout: int = Field(30, ge=0, le=86400, description="stop, restart: seconds to "
                              "wait for the ACPI shutdown")


# The CLI command each action is (its name in the ownership guard's refusal).
COMMAND = {"start": "bstart", "stop": "bstop", "restart": "brestart", "pause": "bpause",
           "resume": "bpause", "hibernate": "bsuspend"}


def check_not_busy(ctx: Context, name: str) -> None:
    """409 at once when a CLI command (or anything) holds the VM's lock: the operation would
    only fail with the same message a moment later."""
    if is_held(ctx.workdir.lock_file(name)):
        raise BusyError(f"{name}: busy: another cbsd command holds it")


@router.put("/{name}/state", status_code=202, summary="Change a VM's state (an operation)")
def change_state(request: Request, name: str, body: StateChange) -> JSONResponse:
    with context(request) as ctx:
        ctx.spec(name)  # 404 before an operation starts
        check_not_busy(ctx, name)
    b = body

    def work(ctx: Context, progress: Progress) -> Any:
        if b.action == "start":
            return lifecycle.start(ctx, name, checkpoint=b.checkpoint, paused=b.paused)
        if b.action == "stop":
            return lifecycle.stop(ctx, name, noacpi=b.noacpi, hard_timeout=b.hard_timeout)
        if b.action == "restart":
            return lifecycle.restart(ctx, name, noacpi=b.noacpi, hard_timeout=b.hard_timeout)
        if b.action in ("pause", "resume"):
            return lifecycle.pause(ctx, name, "on" if b.action == "pause" else "off")
        return hibernate.suspend(ctx, name, progress=progress)

    return started(request, f"{b.action} {name}", [name], work, command=COMMAND[b.action])
