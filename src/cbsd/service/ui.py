"""The web UI: its page and static files, log in and out, and the session check every request
a browser makes goes through (SessionGuard). The page itself is plain ES modules (web/), its
third-party pieces served as their packages ship them: xterm.js from web/node_modules (npm ci
in scripts/setup.sh) and noVNC from Debian's novnc package. No build step.

A browser never holds an API token after logging in: POST /ui/login trades one for a session
(websession.py). The WebSocket endpoints the page uses (the serial console, VNC) are in
consoles.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from starlette.types import ASGIApp, Receive, Scope, Send

from cbsd.service import auth, websession
from cbsd.storage.paths import Workdir, default_workdir

WEB = Path(__file__).with_name("web")
XTERM = WEB / "node_modules" / "@xterm"
NOVNC = Path("/usr/share/novnc")  # Debian's novnc package

router = APIRouter(include_in_schema=False)


def workdir(app: Any) -> Workdir:
    """The workdir the service serves (app.state.config.workdir), else the environment's."""
    wd = getattr(getattr(app.state, "config", None), "workdir", None)
    return wd if isinstance(wd, Workdir) else Workdir(default_workdir())


def sessions(app: Any) -> websession.Sessions:
    """The app's sessions, made on first use: a session lives as long as its token does."""
    found = getattr(app.state, "sessions", None)
    if found is None:
        wd = workdir(app)
        found = websession.Sessions(
            lambda name: any(t["name"] == name for t in auth.list_tokens(wd)))
        app.state.sessions = found
    assert isinstance(found, websession.Sessions)
    return found


def mount_static(app: Any) -> None:
    """The page's files under /ui/static, xterm.js under /ui/xterm, noVNC under /ui/novnc.
    A missing piece (setup.sh not run) is left out: the page says the console is unavailable."""
    app.mount("/ui/static", StaticFiles(directory=WEB / "static"), name="ui-static")
    if XTERM.is_dir():
        app.mount("/ui/xterm", StaticFiles(directory=XTERM), name="ui-xterm")
    if NOVNC.is_dir():
        app.mount("/ui/novnc", StaticFiles(directory=NOVNC, follow_symlink=True),
                  name="ui-novnc")


PUBLIC = ("/ui/static/", "/ui/xterm/", "/ui/novnc/")
PUBLIC_EXACT = frozenset({"/", "/ui/", "/ui/login", "/ui/session", "/ui/logout"})


def is_public(path: str) -> bool:
    """The paths anyone may fetch: the page, its files, and logging in and out (they answer
    401 themselves without a session). Nothing here reads or changes a VM."""
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


class Login(BaseModel):
    token: str


def _secure(request: Request) -> bool:
    return request.url.scheme == "https"


@router.post("/ui/login")
async def login(body: Login, request: Request) -> Response:
    if not websession.same_origin(request.headers.get("origin"), request.url.scheme,
                                  request.headers.get("host")):
        return error(403, "login: the request comes from another site")
    name = auth.token_owner(workdir(request.app), f"Bearer {body.token}")
    if name is None:
        return error(401, "login: the token is not valid")
    sid, session = sessions(request.app).create(name)
    response = JSONResponse({"user": name, "csrf": session.csrf,
                             "idle_timeout": websession.IDLE})
    response.set_cookie(websession.COOKIE, sid, httponly=True, samesite="strict",
                        secure=_secure(request), path="/",
                        max_age=int(websession.LIFETIME))
    return response


@router.get("/ui/session")
async def current(request: Request) -> Response:
    """The page's session after a reload: who, and its CSRF token (the cookie alone cannot be
    read by the page)."""
    session = sessions(request.app).get(request.cookies.get(websession.COOKIE))
    if session is None:
        return error(401, "session: not logged in, or the session expired")
    return JSONResponse({"user": session.token_name, "csrf": session.csrf,
                         "idle_timeout": websession.IDLE})


@router.post("/ui/logout")
async def logout(request: Request) -> Response:
    sessions(request.app).end(request.cookies.get(websession.COOKIE))
    response = JSONResponse({"user": None})
    response.delete_cookie(websession.COOKIE, path="/")
    return response


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


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return bytes(value).decode("latin-1")
    return None


def _cookie(scope: Scope, name: str) -> str | None:
    raw = _header(scope, b"cookie") or ""
    for part in raw.split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return None


class SessionGuard:
    """ASGI middleware in front of every route: a request that carries a live session cookie
    is the session's user (scope state `cbsd_user` = "session:<token name>", which auth
    accepts like a token); a state-changing one must also carry the session's CSRF token and
    come from this origin, else 403. Every WebSocket upgrade whose Origin is another site's is
    refused (403), whatever its credentials: the cookie would be sent along."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        origin_ok = websession.same_origin(
            _header(scope, b"origin"), scope.get("scheme", "http"), _header(scope, b"host"))
        if scope["type"] == "websocket" and not origin_ok:
            await send({"type": "websocket.http.response.start", "status": 403,
                        "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "websocket.http.response.body",
                        "body": b"cross-origin WebSocket refused"})
            return
        sid = _cookie(scope, websession.COOKIE)
        session = sessions(scope["app"]).get(sid) if sid and "app" in scope else None
        if session is not None and scope.get("path") != "/ui/login":  # it checks its origin
            method = scope.get("method", "GET")
            if scope["type"] == "http" and not (
                    origin_ok and websession.csrf_ok(
                        session, method, _header(scope, websession.CSRF_HEADER.encode()))):
                await error(403, "the request lacks the session's CSRF token "
                                 f"({websession.CSRF_HEADER}) or comes from another site"
                            )(scope, receive, send)
                return
            scope.setdefault("state", {})["cbsd_user"] = f"session:{session.token_name}"
        await self.app(scope, receive, send)


def session_user(scope_state: Any) -> str | None:
    """The session user SessionGuard found for a request (its request.state), or None."""
    user = getattr(scope_state, "cbsd_user", None)
    return user if isinstance(user, str) else None
