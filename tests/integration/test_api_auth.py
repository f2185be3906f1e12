"""Who may call the service: anyone on the Unix socket (its mode and group guard it), on TCP
only a client with a token or a trusted client certificate, always over TLS with the
certificate the service made on its first start."""

from __future__ import annotations

import socket
import ssl
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.harness import Cbsd
from tests.service import Service


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def client_cert(where: Path, name: str) -> tuple[str, str]:
    cert, key = where / f"{name}.crt", where / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj",
                    f"/CN={name}", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return str(cert), str(key)


def test_tcp_needs_a_token_or_a_trusted_certificate(cbsd: Cbsd, tmp_path: Path) -> None:
    port = free_port()
    trusted = client_cert(tmp_path, "trusted")
    stranger = client_cert(tmp_path, "stranger")
    (cbsd.workdir / "service").mkdir(parents=True, mode=0o700)
    (cbsd.workdir / "service" / "trusted-clients.pem").write_text(Path(trusted[0]).read_text())
    token = cbsd("token", "mode=add", "name=ci").ok().out.strip()
    assert len(token) >= 40
    with Service(cbsd.workdir, f"listen=127.0.0.1:{port}") as svc:
        server_cert = cbsd.workdir / "service" / "server.crt"
        assert (cbsd.workdir / "service" / "server.key").stat().st_mode & 0o777 == 0o600
        url = f"https://127.0.0.1:{port}"
        ctx = ssl.create_default_context(cafile=str(server_cert))

        def get(headers: dict[str, str] | None = None,
                cert: tuple[str, str] | None = None) -> httpx.Response:
            if cert:
                ctx.load_cert_chain(*cert)
            with httpx.Client(verify=ctx, timeout=30) as c:
                return c.get(f"{url}/1.0/instances", headers=headers or {})

        anonymous = get()
        assert anonymous.status_code == 401 and anonymous.json()["error_code"] == 401
        assert get({"Authorization": "Bearer wrong"}).status_code == 401
        assert get({"Authorization": f"Bearer {token}"}).status_code == 200
        with httpx.Client(verify=ctx, timeout=30) as c:
            info = c.get(f"{url}/1.0", headers={"Authorization": f"Bearer {token}"}).json()
        assert info["auth"] == "token:ci"
        with pytest.raises(httpx.TransportError), \
                httpx.Client(verify=ssl.create_default_context(), timeout=30) as c:
            c.get(f"{url}/1.0")  # the certificate is self-signed: a client pins it
        # plain HTTP is never served on TCP
        with pytest.raises(httpx.TransportError), httpx.Client(timeout=30) as c:
            c.get(f"http://127.0.0.1:{port}/1.0")
        assert get(cert=trusted).status_code == 200
        with pytest.raises(httpx.TransportError):
            ctx = ssl.create_default_context(cafile=str(server_cert))
            get(cert=stranger)  # a certificate not trusted fails the handshake
        ctx = ssl.create_default_context(cafile=str(server_cert))
        browser_session(url, ctx, token)
        cbsd("token", "mode=remove", "name=ci").ok()
        assert get({"Authorization": f"Bearer {token}"}).status_code == 401
        assert svc.client.get("/1.0").json()["auth"] == "unix"
    # the certificate is kept: a client that pinned it still trusts the restarted service
    before = server_cert.read_bytes()
    with Service(cbsd.workdir, f"listen=127.0.0.1:{free_port()}"):
        assert server_cert.read_bytes() == before


def browser_session(url: str, ctx: ssl.SSLContext, token: str) -> None:
    """The UI's login: a token buys a session cookie (HttpOnly, Secure, SameSite=Strict);
    requests that change state with it need its CSRF token; logout ends it."""
    with httpx.Client(verify=ctx, timeout=30, base_url=url) as c:
        assert c.post("/1.0/login", json={"token": "wrong"}).status_code == 401
        r = c.post("/1.0/login", json={"token": token})
        assert r.status_code == 200, r.text
        cookie = r.headers["set-cookie"].lower()
        assert all(a in cookie for a in ("httponly", "secure", "samesite=strict")), cookie
        csrf = r.json()["csrf_token"]
        assert c.get("/1.0").json()["auth"] == "session:ci"
        forged = c.put("/1.0/instances/vm9/state", json={"action": "start"})
        assert forged.status_code == 403 and "CSRF" in forged.json()["error"]
        r = c.put("/1.0/instances/vm9/state", json={"action": "start"},
                  headers={"X-CSRF-Token": csrf})
        assert r.status_code == 404  # past authentication: there is no vm9
        c.post("/1.0/logout", headers={"X-CSRF-Token": csrf})
        assert c.get("/1.0").status_code == 401


def test_one_service_per_workdir_and_its_openapi_document(cbsd: Cbsd) -> None:
    with Service(cbsd.workdir) as svc:
        cbsd("serve").fails(75, "serve: a service already listens on")
        paths = svc.client.get("/openapi.json").json()["paths"]
        assert {"/1.0/instances", "/1.0/instances/{name}/state", "/1.0/events",
                "/1.0/instances/{name}/checkpoints/{cp}/restore",
                "/1.0/operations/{op_id}/wait"} <= set(paths)
        r = svc.client.get("/1.0/nothing")
        assert r.json() == {"error": "cbsd: Not Found", "error_code": 404}
