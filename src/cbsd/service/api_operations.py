"""/1.0/operations: list, show, wait for and cancel the service's operations."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Query, Request

from cbsd.errors import NoSuchVM
from cbsd.service.common import operations
from cbsd.service.operations import Operation

router = APIRouter(prefix="/1.0/operations", tags=["operations"])


def _find(request: Request, op_id: str) -> Operation:
    op = operations(request).get(op_id)
    if op is None:
        # NoSuchVM is the CLI's "no such name" (-> 404); the message names the operation.
        raise NoSuchVM(f"No such operation: {op_id} (operations are kept in the service's "
                       "memory only: a restarted service has forgotten them)")
    return op


@router.get("", summary="Every operation this service run has started")
def listing(request: Request) -> list[dict[str, Any]]:
    return [op.as_json() for op in operations(request).all()]


@router.get("/{op_id}", summary="One operation")
def show(request: Request, op_id: str) -> dict[str, Any]:
    return _find(request, op_id).as_json()


@router.get("/{op_id}/wait", summary="Wait until the operation ends (or timeout s pass)")
async def wait(request: Request, op_id: str,
               timeout: float = Query(30.0, ge=0, le=3600)) -> dict[str, Any]:
    op = _find(request, op_id)
    await asyncio.to_thread(op.finished.wait, timeout)
    return op.as_json()


@router.delete("/{op_id}", summary="Cancel the operation (it rolls back as on Ctrl-C)")
def cancel(request: Request, op_id: str) -> dict[str, Any]:
    op = _find(request, op_id)
    operations(request).cancel(op)
    return op.as_json()
