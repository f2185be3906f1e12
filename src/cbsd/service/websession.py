"""The web UI's sessions: a browser logs in once with an API token and then carries a session
cookie instead of the token; every state-changing request it makes also carries the session's
CSRF token in a header, and every WebSocket it opens comes from the service's own origin.

Sessions live in the service's memory only (a restarted service asks the browser to log in
again; nothing to keep safe on disk). A session ends IDLE seconds after its last use, and
LIFETIME seconds after the login whatever its use, and when its token is removed
(`cbsd token mode=remove`): each use looks the token up again.

The cookie is HttpOnly (scripts cannot read it), SameSite=Strict (another site's page cannot
make the browser send it), Secure on TLS. The CSRF token is a second secret the page reads from
the login answer (or /ui/session) and sends as `X-CSRF-Token`: a form another site posts carries
the cookie at worst (old browsers), never the header. Compared in constant time.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

COOKIE = "cbsd_session"
CSRF_HEADER = "x-csrf-token"
IDLE = 30 * 60.0  # seconds a session lasts without use
LIFETIME = 12 * 3600.0  # seconds a session lasts at most
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass
class Session:
    token_name: str
    csrf: str
    created: float
    used: float = field(default=0.0)


class Sessions:
    """The live sessions, by id. *token_alive* says whether the token a session was made from
    still exists; *clock* is monotonic time (a test may pass its own)."""

    def __init__(self, token_alive: Callable[[str], bool],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._by_id: dict[str, Session] = {}
        self._lock = threading.Lock()
        self._token_alive = token_alive
        self._clock = clock

    def create(self, token_name: str) -> tuple[str, Session]:
        now = self._clock()
        sid = secrets.token_urlsafe(32)
        session = Session(token_name, secrets.token_urlsafe(32), now, now)
        with self._lock:
            self._forget_expired(now)
            self._by_id[sid] = session
        return sid, session

    def get(self, sid: str | None) -> Session | None:
        """The live session *sid* names (its idle time starts again), or None."""
        if not sid:
            return None
        now = self._clock()
        with self._lock:
            session = self._by_id.get(sid)
            if session is None:
                return None
            if self._expired(session, now) or not self._token_alive(session.token_name):
                del self._by_id[sid]
                return None
            session.used = now
            return session

    def end(self, sid: str | None) -> None:
        with self._lock:
            self._by_id.pop(sid or "", None)

    def _expired(self, s: Session, now: float) -> bool:
        return now - s.used > IDLE or now - s.created > LIFETIME

    def _forget_expired(self, now: float) -> None:
        for sid in [k for k, s in self._by_id.items() if self._expired(s, now)]:
            del self._by_id[sid]


def csrf_ok(session: Session, method: str, header: str | None) -> bool:
    """Whether a request of *method* made with *session* may proceed: safe methods always,
    others only with the session's CSRF token in the header."""
    if method.upper() in SAFE_METHODS:
        return True
    return header is not None and hmac.compare_digest(header.encode(), session.csrf.encode())


def same_origin(origin: str | None, scheme: str, host: str | None) -> bool:
    """Whether a browser's Origin header names this service as the browser reached it
    (scheme://Host). A missing Origin is not a browser's request (browsers always send it on
    WebSocket upgrades and cross-site POSTs): it is judged by its other credentials."""
    if origin is None:
        return True
    if not host:
        return False
    web_scheme = {"ws": "http", "wss": "https"}.get(scheme, scheme)
    return hmac.compare_digest(origin.lower().encode(), f"{web_scheme}://{host}".lower().encode())
