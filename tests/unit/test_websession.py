"""The web UI's sessions (cbsd.service.websession): expiry by idle time and by age, the end of
a session whose token is removed, the CSRF check and the Origin check. The browser tier
(tests/integration/test_webui.py) drives the same through a real service."""

from __future__ import annotations

from cbsd.service import websession
from cbsd.service.websession import Sessions, csrf_ok, same_origin


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_session_ends_after_its_idle_time() -> None:
    clock = Clock()
    s = Sessions(lambda name: True, clock)
    sid, _ = s.create("ci")
    clock.now += websession.IDLE - 1
    assert s.get(sid) is not None  # used: its idle time starts again
    clock.now += websession.IDLE - 1
    assert s.get(sid) is not None
    clock.now += websession.IDLE + 1
    assert s.get(sid) is None
    assert s.get(sid) is None  # and stays ended


def test_a_session_ends_at_its_lifetime_however_used() -> None:
    clock = Clock()
    s = Sessions(lambda name: True, clock)
    sid, _ = s.create("ci")
    while clock.now + 60 < 1000.0 + websession.LIFETIME:
        clock.now += 60
        assert s.get(sid) is not None
    clock.now += 120
    assert s.get(sid) is None


def test_a_session_ends_with_its_token() -> None:
    tokens = {"ci"}
    s = Sessions(lambda name: name in tokens)
    sid, _ = s.create("ci")
    assert s.get(sid) is not None
    tokens.clear()
    assert s.get(sid) is None


def test_logout_and_unknown_ids() -> None:
    s = Sessions(lambda name: True)
    sid, _ = s.create("ci")
    assert s.get("x" + sid) is None and s.get(None) is None and s.get("") is None
    s.end(sid)
    assert s.get(sid) is None


def test_csrf_token_needed_for_state_changes_only() -> None:
    _, session = Sessions(lambda name: True).create("ci")
    assert csrf_ok(session, "GET", None) and csrf_ok(session, "HEAD", None)
    for method in ("POST", "PUT", "PATCH", "DELETE"):
        assert not csrf_ok(session, method, None)
        assert not csrf_ok(session, method, session.csrf + "x")
        assert csrf_ok(session, method, session.csrf)
    other = Sessions(lambda name: True).create("ci")[1]
    assert not csrf_ok(session, "POST", other.csrf)


def test_origin_must_be_the_service_itself() -> None:
    assert same_origin("https://127.0.0.1:8443", "https", "127.0.0.1:8443")
    assert same_origin("https://127.0.0.1:8443", "wss", "127.0.0.1:8443")
    assert not same_origin("https://evil.example", "wss", "127.0.0.1:8443")
    assert not same_origin("http://127.0.0.1:8443", "wss", "127.0.0.1:8443")  # scheme differs
    assert not same_origin("https://127.0.0.1:8443", "https", None)
    assert same_origin(None, "https", "127.0.0.1:8443")  # not a browser: its credentials decide
