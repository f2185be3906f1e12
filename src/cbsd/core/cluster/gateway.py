"""Reading etcd with the standard library alone: the read path of the cluster-wide listings
(`bls node='*'`, `bwhereis`, `bcluster mode=status`, `node=auto`), which a short-lived CLI
process pays for at every run.

etcd3gw (the client of store.EtcdStore) brings `requests`, `urllib3`, `futurist` and more:
95-400 ms of imports on this 2-core machine, longer than the whole listing of 1,000 VMs is
allowed to take. A range read is one POST of a small JSON body to etcd's JSON gateway
(/v3/kv/range, the same API etcd3gw speaks; stable since etcd 3.4 under /v3/), so here it is
`http.client` over an `ssl` context that trusts the cluster's CA only and presents this node's
certificate: ~5 ms of imports. Writes, transactions and leases stay with EtcdStore (docs/
architecture.md, "The cluster's client").

The reader is a Store for reading: get() and prefix() answer as EtcdStore's do (one round trip
each, the same KV records); the writing methods are not here."""

from __future__ import annotations

import http.client
import json
import ssl
from typing import Any

# The wire format (base64 keys, the range end of a prefix, a KV from JSON) is store.py's: one
# definition for both clients.
from cbsd.core.cluster.store import ClusterUnreachable, RangeReads


class Reader(RangeReads):
    def __init__(self, endpoints: list[str], ca: str, cert: str, key: str,
                 timeout: float = 5.0) -> None:
        self.endpoints = list(endpoints)
        self.timeout = timeout
        # The cluster's CA is the only one trusted (never the system's bundle), the host name
        # checked against the member's certificate (it names the member's address), and this
        # node's certificate presented: what etcd's --client-cert-auth asks for.
        self._tls = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
        # Strict RFC 5280 checks on every Python, as 3.13 (Debian 13) does by default: the
        # cluster's certificates must pass them on both distributions (core/cluster/pki.py).
        self._tls.verify_flags |= ssl.VERIFY_X509_STRICT
        self._tls.load_cert_chain(cert, key)

    def _post(self, path: str, body: dict[str, Any]) -> Any:
        """POST *body* to /v3*path* on the first endpoint that answers (then asked first
        next time, as EtcdStore does)."""
        data = json.dumps(body).encode()
        errors = []
        for i, ep in enumerate(self.endpoints):
            host, _, port = ep.removeprefix("https://").rpartition(":")
            conn = http.client.HTTPSConnection(host, int(port), timeout=self.timeout,
                                               context=self._tls)
            try:
                conn.request("POST", "/v3" + path, data,
                             {"Content-Type": "application/json"})
                reply = conn.getresponse()
                raw = reply.read()
            except (OSError, http.client.HTTPException) as e:
                # ssl.SSLError and socket timeouts are OSErrors
                errors.append(f"{ep}: {e.__class__.__name__} {e}".strip())
                continue
            finally:
                conn.close()
            if reply.status != 200:
                errors.append(f"{ep}: HTTP {reply.status} {raw[:200].decode(errors='replace')}")
                continue
            if i:
                self.endpoints.insert(0, self.endpoints.pop(i))
            try:
                return json.loads(raw)
            except ValueError:
                errors.append(f"{ep}: not JSON: {raw[:100]!r}")
        raise ClusterUnreachable("cluster: no etcd endpoint answered (" +
                                 "; ".join(e[:200] for e in errors) + ")")
