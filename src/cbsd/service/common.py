"""What every router needs: a Context per request, the service's config and operations."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from cbsd.core.vm.context import Context
from cbsd.service.operations import Operation, Operations, Work


@contextmanager
def context(request: Request, *, writable: bool = False) -> Iterator[Context]:
    """A Context of the service's workdir for this request's thread (SQLite connections are
    per thread), closed after."""
    ctx = Context(request.app.state.config.workdir, writable=writable)
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


def started(request: Request, description: str, instances: list[str], work: Work
            ) -> JSONResponse:
    """Start an operation: 202 with the operation object, its URL in Location."""
    op: Operation = operations(request).start(description, instances, work)
    return JSONResponse(op.as_json(), status_code=202,
                        headers={"Location": f"/1.0/operations/{op.id}"})
