"""The listings' read path (core/cluster/gateway.py): etcd's JSON gateway over the standard
library's HTTPS, against a stand-in for etcd on 127.0.0.1 -- a TLS server with a node
certificate of the cluster's CA that requires a client certificate of that CA, answering
/v3/kv/range as etcd does. The real etcd: tests/integration/test_cluster_list.py."""

from __future__ import annotations

import base64
import json
import socket
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from cbsd.cli.main import main
from cbsd.core.cluster import config, pki
from cbsd.core.cluster.config import Config
from cbsd.core.cluster.gateway import Reader
from cbsd.core.cluster.store import ClusterUnreachable
from cbsd.storage.paths import Workdir

KVS = {"/cbsd/node/a": {"address": "127.0.0.1"}, "/cbsd/alive/a": {"mem_free": 1},
       "/cbsd/vm/v1": {"node": "a", "status": "On", "ram": 64, "cpus": 1},
       "/cbsd/vm/v2": {"node": "b", "status": "Off", "ram": 32, "cpus": 2}}


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


class Etcd(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert self.path == "/v3/kv/range"
        start = base64.b64decode(body["key"]).decode()
        end = base64.b64decode(body["range_end"]).decode() if "range_end" in body else None
        hits = [k for k in sorted(KVS) if (start <= k < end if end else k == start)]
        answer = {"header": {}, "kvs": [
            {"key": _b64(k.encode()), "value": _b64(json.dumps(KVS[k]).encode()),
             "mod_revision": "7"} for k in hits]}
        data = json.dumps(answer if hits else {"header": {}}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Workdir, str]]:
    """A cluster node's workdir whose first endpoint refuses connections and whose second is
    the stand-in; yields (workdir, the stand-in's endpoint)."""
    wd = Workdir(tmp_path / "wd")
    wd.ensure()
    d = config.folder(wd)
    d.mkdir(mode=0o700)
    pki.make_ca(d)
    pki.issue(d, d, "a", "127.0.0.1")
    server = ThreadingHTTPServer(("127.0.0.1", 0), Etcd)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(d / "ca.crt"))
    tls.load_cert_chain(d / "node.crt", d / "node.key")
    tls.verify_mode = ssl.CERT_REQUIRED  # etcd's --client-cert-auth
    server.socket = tls.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    served = f"https://127.0.0.1:{server.server_address[1]}"
    config.save(wd, Config("a", "127.0.0.1", [f"https://127.0.0.1:{closed}", served], True))
    monkeypatch.setenv("CBSD_WORKDIR", str(wd.root))
    try:
        yield wd, served
    finally:
        server.shutdown()
        server.server_close()


def test_a_range_read_answers_the_records_and_the_answering_endpoint_goes_first(
        node: tuple[Workdir, str]) -> None:
    wd, served = node
    d = config.folder(wd)
    r = Reader(config.load(wd).endpoints, str(d / "ca.crt"),  # type: ignore[union-attr]
               str(d / "node.crt"), str(d / "node.key"))
    kvs = r.prefix("/cbsd/vm/")
    assert [(kv.key, kv.json()["node"], kv.mod_revision) for kv in kvs] == [
        ("/cbsd/vm/v1", "a", 7), ("/cbsd/vm/v2", "b", 7)]
    assert r.endpoints[0] == served
    got = r.get("/cbsd/vm/v2")
    assert got is not None and got.json()["cpus"] == 2
    assert r.get("/cbsd/vm/none") is None


def test_bls_node_star_lists_the_cluster_through_the_read_path(
        node: tuple[Workdir, str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bls", "node=*", "format=json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["jname"], r["node"], r["node_state"]) for r in rows] == [
        ("v1", "a", "up"), ("v2", "b", "down")]


def test_no_endpoint_answering_is_one_line_and_exit_1(
        node: tuple[Workdir, str], capsys: pytest.CaptureFixture[str]) -> None:
    wd, _ = node
    cfg = config.load(wd)
    assert cfg is not None
    cfg.endpoints = cfg.endpoints[:1]  # the closed port only
    config.save(wd, cfg)
    assert main(["bls", "node=*"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert "cluster: no etcd endpoint answered" in err and cfg.endpoints[0] in err


def test_a_server_without_the_clusters_ca_is_refused(
        node: tuple[Workdir, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A client that trusts another CA (another cluster's) refuses the stand-in's certificate:
    the read trusts the cluster's CA file only."""
    wd, served = node
    other = tmp_path / "other"
    other.mkdir()
    pki.make_ca(other)
    d = config.folder(wd)
    r = Reader([served], str(other / "ca.crt"), str(d / "node.crt"), str(d / "node.key"))
    with pytest.raises(ClusterUnreachable, match=r"no etcd endpoint answered.*CERTIFICATE_VERIFY"):
        r.prefix("/cbsd/")
