"""The cluster's certificates, made with openssl(1): a CA at `bcluster mode=init` (its key
stays on that node, 0600) and, per node, one key and certificate for both sides of TLS --
etcd serves clients and peers with it and cbsd presents it as its client certificate. The
certificate names the node's address (subjectAltName), which etcd checks for peers."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

from cbsd.errors import StateError

DAYS = "3650"
CURVE = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def _run(argv: list[str]) -> None:
    p = subprocess.run(argv, capture_output=True, text=True)
    if p.returncode != 0:
        last = (p.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise StateError(f"cluster: {argv[0]} {argv[1]} failed: {last}")


# The extensions a strict verifier asks of a CA (RFC 5280; Python 3.13's ssl sets
# VERIFY_X509_STRICT by default and refuses a CA without keyUsage), spelled out rather than
# left to the defaults of the openssl.cnf at hand.
CA_EXTENSIONS = ["basicConstraints=critical,CA:TRUE", "keyUsage=critical,keyCertSign,cRLSign",
                 "subjectKeyIdentifier=hash"]


def make_ca(d: Path) -> None:
    _run(["openssl", "req", "-x509", *CURVE, "-keyout", str(d / "ca.key"), "-out",
          str(d / "ca.crt"), "-days", DAYS, "-subj", "/CN=cbsd cluster CA",
          *[a for e in CA_EXTENSIONS for a in ("-addext", e)]])
    os.chmod(d / "ca.key", 0o600)


def issue(ca_dir: Path, out: Path, name: str, address: str) -> None:
    """out/node.key and out/node.crt for node *name* at *address*, signed by ca_dir's CA."""
    with tempfile.TemporaryDirectory() as tmp:
        csr, ext = Path(tmp) / "node.csr", Path(tmp) / "ext"
        ext.write_text(f"subjectAltName=IP:{address},IP:127.0.0.1\n"
                       "extendedKeyUsage=serverAuth,clientAuth\n"
                       "keyUsage=critical,digitalSignature,keyEncipherment\n"
                       # a strict verifier (Python 3.13) wants the issuer's key named
                       "authorityKeyIdentifier=keyid,issuer\n"
                       "subjectKeyIdentifier=hash\n")
        _run(["openssl", "req", "-new", *CURVE, "-keyout", str(out / "node.key"), "-out",
              str(csr), "-subj", f"/CN={name}"])
        os.chmod(out / "node.key", 0o600)
        _run(["openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca_dir / "ca.crt"),
              "-CAkey", str(ca_dir / "ca.key"), "-CAcreateserial", "-days", DAYS,
              "-extfile", str(ext), "-out", str(out / "node.crt")])
    if out != ca_dir:
        (out / "ca.crt").write_bytes((ca_dir / "ca.crt").read_bytes())
