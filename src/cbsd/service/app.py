"""create_app(config) -> the FastAPI application: every router, the error format, and who may
call it (auth.py). The routers call the same core functions the CLI's handlers call."""

from __future__ import annotations

import asyncio
import contextlib
import platform
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from cbsd import __version__
from cbsd.core.cluster.owner import NotOwner
from cbsd.errors import BusyError, CbsdError, NoSuchVM, UsageError, describe
from cbsd.service import auth, consoles, events, sessions, ui
from cbsd.service.metrics import ServiceMetrics
from cbsd.service.operations import Operation, Operations
from cbsd.service.pools import Forbidden
from cbsd.service.rowcache import RowCache
from cbsd.service.scheduler import Scheduler
from cbsd.storage.paths import Workdir

Keys = Callable[[str, dict[str, Any]], dict[str, Any]]


@dataclass
class Config:
    workdir: Workdir
    keys: Keys  # (command, JSON body) -> the command's parsed keys (cli/serve.api_keys)
    listen: str | None = None  # ADDRESS:PORT of the TLS listener, if any
    pools: list[Path] = field(default_factory=list)


def status_of(e: BaseException) -> int:
    """The HTTP status for an error, from what the CLI's exit code says (docs/api.md)."""
    if isinstance(e, Forbidden):
        return 403
    if isinstance(e, NoSuchVM):
        return 404
    if isinstance(e, BusyError | NotOwner):
        return 409  # NotOwner: another cluster node owns the VM; it is to be asked there
    if isinstance(e, UsageError):
        return 400
    return 500


def error(e: BaseException) -> JSONResponse:
    message, _ = describe(e)
    status = status_of(e)
    return JSONResponse({"error": message, "error_code": status}, status_code=status)


def create_app(config: Config) -> FastAPI:
    bus = events.Bus()
    rows = RowCache(config.workdir)  # GET /1.0/instances and the watcher's looks
    watcher = events.StatusWatcher(config.workdir, bus, rows)
    # GET /metrics (api_metrics.py), its VMs read through the list's row cache
    metrics = ServiceMetrics(lambda: config.workdir, source=rows.stats)

    def notify(op: Operation) -> None:
        metrics.tally.observe(op.id, op.status)
        bus.publish("operation", op.as_json())
        if op.finished.is_set():
            watcher.look()  # the VM's new status, at once (in the operation's thread)

    # The checkpoint schedules' tick, once a minute, in its own thread (service/scheduler.py).
    scheduler = Scheduler(config.workdir)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        bus.bind(asyncio.get_running_loop())
        task = asyncio.create_task(watcher.run())
        scheduler.start()
        yield
        task.cancel()
        scheduler.stop(timeout=0)  # a tick under way ends with the process, as a killed bschedule

    # No /docs or /redoc: their pages load scripts from a CDN; /openapi.json is the document.
    app = FastAPI(title="cbsd", version=__version__, lifespan=lifespan, docs_url=None,
                  redoc_url=None,
                  description="The cbsd service's REST API (docs/api.md).")
    app.state.config = config
    app.state.cbsd_metrics = metrics
    app.state.bus = bus
    app.state.rows = rows
    app.state.operations = Operations(config.workdir, notify)
    app.state.sessions = sessions.Sessions(
        token_exists=lambda owner: auth.token_exists(config.workdir, owner))
    app.state.scheduler = scheduler

    @app.exception_handler(CbsdError)
    async def cbsd_error(request: Request, e: CbsdError) -> JSONResponse:
        return error(e)

    @app.exception_handler(RequestValidationError)
    async def bad_body(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error(UsageError(f"{request.method} {request.url.path}: {where or 'body'}: "
                                f"{first.get('msg', 'invalid')}"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": f"cbsd: {e.detail}", "error_code": e.status_code},
                            status_code=e.status_code)

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception) -> JSONResponse:
        return error(e)  # one line, as the CLI's internal error (traceback: CBSD_DEBUG=1)

    @app.middleware("http")
    async def authenticate(request: Request,
                           call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        how, refused = who(config.workdir, request)
        if refused:
            return JSONResponse({"error": refused, "error_code": 403}, status_code=403)
        if how is None and request.url.path == "/1.0/login" and request.method == "POST":
            how = "login"  # checks the token it is given itself
        if how is None and ui.is_public(request.url.path):
            how = "anonymous"  # the web UI's page and its files: no VM reached
        if how is None:
            return JSONResponse({"error": "cbsd: authentication required (a token: "
                                 "'Authorization: Bearer TOKEN', or a trusted client "
                                 "certificate)", "error_code": 401}, status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
        request.state.auth = how
        return await call_next(request)

    @app.get("/1.0", summary="Server information")
    def server_info(request: Request) -> dict[str, Any]:
        # lazy: the host's probe (cached) only when asked
        from cbsd.core.vm.context import Context

        host = Context(config.workdir, writable=False).host
        return {"api_version": "1.0", "version": __version__, "host": platform.node(),
                "accel": host.accel, "qemu_version": host.version,
                "auth": request.state.auth, "pools": [str(p) for p in config.pools]}

    # lazy: the routers import the core; create_app is their one user
    from cbsd.service import (
        api_checkpoints,
        api_disks,
        api_instances,
        api_metrics,
        api_operations,
        api_state,
    )

    for module in (api_instances, api_state, api_checkpoints, api_disks, api_operations,
                   events, sessions, api_metrics, ui, consoles):
        app.include_router(module.router)
    ui.mount_static(app)
    return app


def who(wd: Workdir, request: Request) -> tuple[str | None, str | None]:
    """(how this request is authenticated: 'unix' (the local socket: trusted), 'certificate'
    (a client certificate the TLS handshake verified), 'token:NAME', 'session:NAME' (the UI's
    cookie), or None; why it is refused although it carries a session, or None)."""
    scope = request.scope
    if scope.get("cbsd.transport") == "unix":
        return "unix", None
    if scope.get("cbsd.client_cert"):
        return "certificate", None
    name = auth.token_owner(wd, request.headers.get("authorization"))
    if name:
        return f"token:{name}", None
    return sessions.session_auth(request)
