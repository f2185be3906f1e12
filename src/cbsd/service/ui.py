"""The web UI: its page and static files, the session's CSRF token after a reload, the images
the create form offers, and who may open the console's and VNC's WebSockets. The page itself
is plain ES modules (web/), its
third-party pieces served as their packages ship them: xterm.js from web/node_modules (npm ci
in scripts/setup.sh) and noVNC from Debian's novnc package. No build step.

A browser never holds an API token after logging in: POST /1.0/login trades one for a session
cookie and a CSRF token (sessions.py). The WebSocket endpoints the page uses (the serial
console, VNC) are in consoles.py; who may open them is websocket_user() here (the HTTP
middleware of app.py does not see WebSockets).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request, Response, WebSocket
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

from cbsd.service import auth, sessions
from cbsd.storage.paths import Workdir, default_workdir

WEB = Path(__file__).with_name("web")
XTERM = WEB / "node_modules" / "@xterm"
NOVNC = Path("/usr/share/novnc")  # Debian's novnc package

router = APIRouter(include_in_schema=False)


def workdir(app: Any) -> Workdir:
    """The workdir the service serves (app.state.config.workdir), else the environment's."""
    wd = getattr(getattr(app.state, "config", None), "workdir", None)
    return wd if isinstance(wd, Workdir) else Workdir(default_workdir())


def mount_static(app: Any) -> None:
    """The page's files under /ui/static, xterm.js under /ui/xterm, noVNC under /ui/novnc.
    scripts/setup.sh installs both; one that is missing is not mounted (its files 404)."""
    app.mount("/ui/static", StaticFiles(directory=WEB / "static"), name="ui-static")
    if XTERM.is_dir():
        app.mount("/ui/xterm", StaticFiles(directory=XTERM), name="ui-xterm")
    if NOVNC.is_dir():
        app.mount("/ui/novnc", StaticFiles(directory=NOVNC, follow_symlink=True),
                  name="ui-novnc")


PUBLIC = ("/ui/static/", "/ui/xterm/", "/ui/novnc/")
PUBLIC_EXACT = frozenset({"/", "/ui/", "/ui/session"})


def is_public(path: str) -> bool:
    """The paths anyone may fetch: the page, its files, and /ui/session (401 without one).
    Nothing here reads or changes a VM."""
    return path in PUBLIC_EXACT or path.startswith(PUBLIC)


def error(status: int, message: str) -> JSONResponse:
    """The API's error shape (docs/api.md)."""
    return JSONResponse({"error": message, "error_code": status}, status_code=status)


@router.get("/")
async def root() -> RedirectResponse:
    return RedirectResponse("/ui/", status_code=303)


@router.get("/ui/")
async def page() -> FileResponse:
    # no-store: a page cached from before a logout must not come back with the back button
    return FileResponse(WEB / "index.html", headers={
        "Cache-Control": "no-store",
        "Content-Security-Policy": CSP, "X-Frame-Options": "DENY",
        "Referrer-Policy": "same-origin"})


# The page runs only its own scripts and reaches only its own origin (the console's and VNC's
# WebSockets included: 'self' covers ws(s) to the same host in current browsers).
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
       "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
       "form-action 'self'")


@router.get("/ui/session")
async def current(request: Request) -> Response:
    """The page's session after a reload: who, and its CSRF token (the page cannot read the
    HttpOnly cookie; it gets the token from POST /1.0/login, or from here)."""
    found = _session(request.app, request.cookies.get(sessions.COOKIE))
    if found is None:
        return error(401, "cbsd: not logged in, or the session expired")
    return JSONResponse({"owner": found.owner, "csrf_token": found.csrf})


def _session(app: Any, sid: str | None) -> sessions.Session | None:
    live: sessions.Sessions = app.state.sessions
    return live.get(sid)


IMAGE_SUFFIXES = (".raw", ".img", ".qcow2", ".iso", ".vmdk", ".vdi", ".vhdx")
MAX_IMAGES = 1000


@router.get("/ui/images")
def images(request: Request) -> list[str]:
    """The disk images and ISOs in the image pools (the folders `cbsd serve pools=` allows):
    what the create form offers. Only files inside a pool, as the API only accepts those."""
    config = getattr(request.app.state, "config", None)
    found: list[str] = []
    for pool in getattr(config, "pools", []):
        for path in sorted(Path(pool).rglob("*")):
            if len(found) >= MAX_IMAGES:
                return found
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                found.append(str(path))
    return found


def websocket_user(ws: WebSocket) -> str | None:
    """Who may open this WebSocket (the console, VNC), or None. Its Origin, when it sends one
    (browsers always do), must be the service itself: a page of another site would otherwise
    drive the console with the browser's cookie. Then: the Unix socket's peer, a valid bearer
    token, or a live session (a session only with a matching Origin, which browsers set)."""
    origin = ws.headers.get("origin")
    tls = ws.url.scheme == "wss"
    if origin is not None and not sessions.origin_ok(ws.headers, tls):
        return None
    if ws.scope.get("cbsd.transport") == "unix":
        return "unix"
    name = auth.token_owner(workdir(ws.app), ws.headers.get("authorization"))
    if name:
        return f"token:{name}"
    found = _session(ws.app, ws.cookies.get(sessions.COOKIE))
    return f"session:{found.owner}" if found is not None and origin is not None else None
