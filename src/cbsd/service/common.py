"""What every router needs: a Context per request, the service's config and operations."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from cbsd.core.cluster import guard
from cbsd.core.vm.context import Context
from cbsd.service.operations import Operation, Operations, Work


@contextmanager
def context(request: Request, *, writable: bool = False) -> Iterator[Context]:
    """A Context of the service's workdir for this request's thread (SQLite connections are
    per thread), closed after; on a cluster node, with the ownership guard the CLI's commands
    run in (core/cluster/guard.py)."""
    ctx = Context(request.app.state.config.workdir, writable=writable)
    guard.install_if_node(ctx)
    try:
        yield ctx
    finally:
        if "inventory" in ctx.__dict__:
            ctx.inventory.close()


def operations(request: Request) -> Operations:
    ops: Operations = request.app.state.operations
    return ops


def keys(request: Request, command: str, body: dict[str, Any]) -> dict[str, Any]:
    """*body* checked by *command*'s key table (the CLI's), see cli/serve.api_keys."""
    out: dict[str, Any] = request.app.state.config.keys(command, body)
    return out


def started(request: Request, description: str, instances: list[str], work: Work, *,
            command: str) -> JSONResponse:
    """Start an operation: 202 with the operation object, its URL in Location. On a cluster
    node, a VM of *instances* another node owns is refused first (409, the message the CLI's
    *command* gets), as the operation's own guard would refuse it a moment later."""
    guard.check_owned(request.app.state.config.workdir, instances, command)
    op: Operation = operations(request).start(description, instances, work)
    return JSONResponse(op.as_json(), status_code=202,
                        headers={"Location": f"/1.0/operations/{op.id}"})
