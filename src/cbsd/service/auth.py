"""Who may use the service: the Unix socket's peers (trusted, as Incus's local socket), and on
TCP clients with a token or a trusted client certificate. Also the TLS certificate the TCP
listener presents, made on first start.

Only the standard library (and Debian's openssl command for the certificate): `cbsd token`
imports this module, and the CLI must not load the web stack to manage tokens.

Tokens are 32 random bytes (secrets.token_urlsafe). Only their SHA-256 is kept: a token has the
entropy of a key, so a slow password hash would add nothing, and a constant-time comparison of
digests (hmac.compare_digest) leaks nothing about the stored ones.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import secrets
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from cbsd.errors import EnvironmentFault, UsageError
from cbsd.storage.atomic import write_atomic
from cbsd.storage.paths import Workdir

CERT_DAYS = 3650


def service_dir(wd: Workdir) -> Path:
    """<workdir>/service: the certificate, its key, the tokens, the trusted client certs."""
    path = wd.root / "service"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def socket_path(wd: Workdir) -> Path:
    return wd.root / "cbsd.sock"


def _tokens_file(wd: Workdir) -> Path:
    return service_dir(wd) / "tokens.json"


def _load(wd: Workdir) -> dict[str, dict[str, Any]]:
    path = _tokens_file(wd)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise EnvironmentFault(f"cbsd: cannot read the API tokens {path}: {e}") from None
    if not isinstance(data, dict):
        raise EnvironmentFault(f"cbsd: the API tokens file {path} is damaged")
    return data


def _save(wd: Workdir, tokens: dict[str, dict[str, Any]]) -> None:
    write_atomic(_tokens_file(wd), (json.dumps(tokens, indent=1) + "\n").encode(), mode=0o600)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def add_token(wd: Workdir, name: str) -> str:
    """A new token named *name*; returned once, only its hash is stored."""
    tokens = _load(wd)
    if name in tokens:
        raise UsageError(f"token: a token named {name} exists (mode=remove it first)")
    token = secrets.token_urlsafe(32)
    tokens[name] = {"sha256": _digest(token), "created": int(time.time())}
    _save(wd, tokens)
    return token


def list_tokens(wd: Workdir) -> list[dict[str, Any]]:
    return [{"name": n, "created": t.get("created", 0)} for n, t in sorted(_load(wd).items())]


def token_exists(wd: Workdir, name: str) -> bool:
    return name in _load(wd)


def remove_token(wd: Workdir, name: str) -> str:
    tokens = _load(wd)
    if tokens.pop(name, None) is None:
        raise UsageError(f"token: no token named {name} (see mode=list)")
    _save(wd, tokens)
    return f"token {name}: removed"


def token_owner(wd: Workdir, authorization: str | None) -> str | None:
    """The name of the token an 'Authorization: Bearer ...' header carries, or None."""
    if not authorization or not authorization.startswith("Bearer "):
        return None
    digest = _digest(authorization.removeprefix("Bearer ").strip())
    found = None
    for name, entry in _load(wd).items():  # every entry compared: no early exit to time
        if hmac.compare_digest(str(entry.get("sha256", "")), digest):
            found = name
    return found


def trusted_clients(wd: Workdir) -> Path:
    """PEM file of the client certificates (or CAs) the TCP listener trusts: an administrator
    appends a client's certificate to it (docs/api.md)."""
    return service_dir(wd) / "trusted-clients.pem"


def server_certificate(wd: Workdir) -> tuple[Path, Path]:
    """(certificate, key) of the TCP listener: made on first start with Debian's openssl
    (ECDSA P-256, self-signed, this host's name), owner-only; kept and reused after."""
    d = service_dir(wd)
    cert, key = d / "server.crt", d / "server.key"
    if cert.exists() and key.exists():
        return cert, key
    host = socket.gethostname()
    tmp_cert, tmp_key = d / "server.crt.tmp", d / "server.key.tmp"
    old = os.umask(0o077)
    try:
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
             "ec_paramgen_curve:prime256v1", "-nodes", "-days", str(CERT_DAYS),
             "-keyout", str(tmp_key), "-out", str(tmp_cert), "-subj", f"/CN={host}",
             "-addext", f"subjectAltName=DNS:{host},DNS:localhost,IP:127.0.0.1"],
            check=True, capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        raise EnvironmentFault(f"cbsd: cannot make the service's TLS certificate: {e}") from None
    finally:
        os.umask(old)
    os.replace(tmp_key, key)
    os.replace(tmp_cert, cert)
    return cert, key


def fingerprint(cert: Path) -> str:
    """The certificate's SHA-256 fingerprint, as clients pin it."""
    # lazy: only when the TCP listener starts
    import ssl

    der = ssl.PEM_cert_to_DER_cert(cert.read_text())
    return hashlib.sha256(der).hexdigest()


def socket_group() -> int | None:
    """The gid of group 'cbsd' (the socket's group), or None where it does not exist."""
    # lazy: only the service, once at start
    import grp

    with contextlib.suppress(KeyError):
        return grp.getgrnam("cbsd").gr_gid
    return None
