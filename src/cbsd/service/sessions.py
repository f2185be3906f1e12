"""The web UI's sessions: a browser logs in with a token (POST /1.0/login) and gets a session
cookie (HttpOnly, SameSite=Strict, Secure over TLS) that expires -- 8 hours after the log-in,
after 30 minutes unused, or at once when its token is removed (`cbsd token mode=remove`); a
log-in from a page of another origin is refused (login CSRF); every state-changing request
made with that cookie must carry the session's CSRF token in the X-CSRF-Token header (a page
from another site cannot read it); a WebSocket upgrade must come from the service's own origin.

Sessions live in memory: a restarted service logs every browser out.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from cbsd.service import auth

COOKIE = "cbsd_session"
CSRF_HEADER = "x-csrf-token"
LIFETIME = 8 * 3600.0  # seconds a session lasts after login
IDLE = 30 * 60.0  # seconds a session lasts unused
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")

router = APIRouter(tags=["sessions"])


@dataclass
class Session:
    owner: str  # the name of the token the session was bought with
    csrf: str
    expires: float
    used: float  # when it last authenticated a request (time.monotonic())


class Sessions:
    def __init__(self, lifetime: float = LIFETIME, idle: float = IDLE,
                 token_exists: Callable[[str], bool] = lambda owner: True) -> None:
        self.lifetime = lifetime
        self.idle = idle
        # A session is worth what its token is: asked at every use, so a removed token
        # logs its browsers out at once.
        self.token_exists = token_exists
        self._by_id: dict[str, Session] = {}
        self._lock = threading.Lock()

    def new(self, owner: str) -> tuple[str, Session]:
        sid = secrets.token_urlsafe(32)
        now = time.monotonic()
        s = Session(owner, secrets.token_urlsafe(32), now + self.lifetime, now)
        with self._lock:
            now = time.monotonic()
            self._by_id = {k: v for k, v in self._by_id.items() if v.expires > now}
            self._by_id[sid] = s
        return sid, s

    def get(self, sid: str | None) -> Session | None:
        if not sid:
            return None
        s = self._by_id.get(sid)
        now = time.monotonic()
        if s is None:
            return None
        if s.expires <= now or now - s.used > self.idle or not self.token_exists(s.owner):
            self.end(sid)
            return None
        s.used = now
        return s

    def end(self, sid: str | None) -> None:
        with self._lock:
            self._by_id.pop(sid or "", None)


def session_auth(request: Request) -> tuple[str | None, str | None]:
    """(how the request is authenticated by its session cookie, or None; the refusal, if the
    request uses a session but fails its CSRF check)."""
    sessions: Sessions = request.app.state.sessions
    s = sessions.get(request.cookies.get(COOKIE))
    if s is None:
        return None, None
    if request.method not in SAFE_METHODS and not secrets.compare_digest(
            request.headers.get(CSRF_HEADER, ""), s.csrf):
        return None, ("cbsd: this request needs the session's CSRF token in the X-CSRF-Token "
                      "header")
    return f"session:{s.owner}", None


def origin_ok(headers: Any, tls: bool) -> bool:
    """A WebSocket upgrade (or any cross-origin request) must name the service itself as
    its Origin: a page of another site may not drive a console."""
    origin, host = headers.get("origin"), headers.get("host")
    return bool(origin and host) and origin == f"{'https' if tls else 'http'}://{host}"


class Login(BaseModel):
    token: str


@router.post("/1.0/login", summary="Log a browser in with a token: a session cookie")
def login(request: Request, body: Login) -> Response:
    cfg = request.app.state.config
    if request.headers.get("origin") is not None and not origin_ok(
            request.headers, tls=request.url.scheme == "https"):
        # A page of another site could otherwise log the browser into a session of its own
        # choosing (login CSRF); a client that is no browser sends no Origin.
        return JSONResponse({"error": "cbsd: a log-in from another origin", "error_code": 403},
                            status_code=403)
    owner = auth.token_owner(cfg.workdir, f"Bearer {body.token}")
    if owner is None:
        return JSONResponse({"error": "cbsd: unknown token", "error_code": 401},
                            status_code=401)
    sessions: Sessions = request.app.state.sessions
    sid, s = sessions.new(owner)
    r = JSONResponse({"csrf_token": s.csrf, "expires_in": sessions.lifetime, "owner": owner})
    r.set_cookie(COOKIE, sid, max_age=int(sessions.lifetime), httponly=True,
                 samesite="strict", secure=request.url.scheme == "https", path="/")
    return r


@router.post("/1.0/logout", summary="End this browser's session")
def logout(request: Request) -> Response:
    request.app.state.sessions.end(request.cookies.get(COOKIE))
    r = JSONResponse({"result": "logged out"})
    r.delete_cookie(COOKIE, path="/")
    return r
