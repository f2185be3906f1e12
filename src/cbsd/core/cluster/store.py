"""The few things cbsd asks of etcd, behind a small interface of its own (Store), so the
ownership and registration logic is unit-tested against a fake (tests/unit/core/cluster/) and
the client library could be replaced in one module.

EtcdStore speaks etcd's JSON gRPC gateway (/v3/kv/range, /v3/kv/txn, /v3/lease/*) through
etcd3gw's client, which brings the API-path discovery (etcd 3.4 and 3.5 differ), the TLS
session with the client certificate and the mapping of HTTP errors. etcd3gw (and its
`requests`) is imported only when a cluster is configured: SSH-only commands never load it."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any, Protocol

from cbsd.errors import EnvironmentFault


class ClusterUnreachable(EnvironmentFault):
    """No etcd endpoint answered (or answered an error): the cluster's truth is unknown, so a
    command that needs it does nothing."""


@dataclass(frozen=True)
class KV:
    key: str
    value: bytes
    mod_revision: int
    lease: int = 0

    def json(self) -> Any:
        return json.loads(self.value)


@dataclass(frozen=True)
class Compare:
    """A txn guard: the key's mod revision equals *mod_revision* (0: the key does not
    exist), and, if *value* is given, its value equals it."""
    key: str
    mod_revision: int


@dataclass(frozen=True)
class Put:
    key: str
    value: bytes
    lease: int = 0


@dataclass(frozen=True)
class Delete:
    key: str


class Reads(Protocol):
    """What a reader of the cluster needs (gateway.Reader is one, with the standard library)."""
    def get(self, key: str) -> KV | None: ...

    def prefix(self, prefix: str) -> list[KV]:
        """Every key under *prefix*, in one range read (one round trip)."""
        ...


class Store(Reads, Protocol):
    """Reads, and the writes: the guard's transactions, the keeper's lease, bcluster's."""

    def txn(self, compares: list[Compare], ops: list[Put | Delete]) -> bool:
        """Apply *ops* atomically iff every compare holds; whether they were applied."""
        ...

    def grant(self, ttl: int) -> int: ...

    def keepalive(self, lease: int) -> int:
        """Renew *lease*; the TTL it has now (<= 0: it lapsed, its keys are gone)."""
        ...

    def revoke(self, lease: int) -> None: ...


def _b64(s: str | bytes) -> str:
    return base64.b64encode(s.encode() if isinstance(s, str) else s).decode()


def _prefix_end(prefix: str) -> str:
    b = bytearray(prefix.encode())
    b[-1] += 1  # cbsd's prefixes end in '/': never 0xff
    return _b64(bytes(b))


class RangeReads:
    """get() and prefix() as etcd's JSON gateway answers them (/v3/kv/range), over the
    subclass's _post(path, body) -> decoded answer: EtcdStore's (etcd3gw) and
    gateway.Reader's (the standard library) alike."""

    def _post(self, path: str, body: dict[str, Any]) -> Any:
        raise NotImplementedError

    @staticmethod
    def _kv(raw: dict[str, Any]) -> KV:
        return KV(base64.b64decode(raw["key"]).decode(),
                  base64.b64decode(raw.get("value", "")),
                  int(raw.get("mod_revision", 0)), int(raw.get("lease", 0)))

    def get(self, key: str) -> KV | None:
        kvs = self._post("/kv/range", {"key": _b64(key)}).get("kvs", [])
        return self._kv(kvs[0]) if kvs else None

    def prefix(self, prefix: str) -> list[KV]:
        r = self._post("/kv/range", {"key": _b64(prefix), "range_end": _prefix_end(prefix)})
        return [self._kv(kv) for kv in r.get("kvs", [])]


class EtcdStore(RangeReads):
    def __init__(self, endpoints: list[str], ca: str, cert: str, key: str,
                 timeout: float = 5.0) -> None:
        # lazy: only a clustered command loads the client (and requests)
        import etcd3gw  # type: ignore[import-untyped,unused-ignore]

        self._clients: list[Any] = []
        for ep in endpoints:
            host, _, port = ep.removeprefix("https://").rpartition(":")
            client = etcd3gw.Etcd3Client(
                host=host, port=int(port), protocol="https", ca_cert=ca, cert_cert=cert,
                cert_key=key, timeout=timeout, api_path="/v3/")  # 3.4 and 3.5 serve /v3/
            # Never the environment's proxies or CA bundle: requests lets REQUESTS_CA_BUNDLE
            # override the session's CA (the cluster's), and a proxy has no business here.
            client.session.trust_env = False
            self._clients.append(client)
        self.endpoints = endpoints

    def _post(self, path: str, body: dict[str, Any]) -> Any:
        # lazy: as above
        from etcd3gw import exceptions

        errors = []
        for i, c in enumerate(self._clients):
            try:
                result = c.post(c.get_url(path), json=body)
            except exceptions.Etcd3Exception as e:
                errors.append(f"{self.endpoints[i]}: {e.__class__.__name__} {e}".strip())
                continue
            if i:  # ask the one that answered first next time
                self._clients.insert(0, self._clients.pop(i))
                self.endpoints.insert(0, self.endpoints.pop(i))
            return result
        raise ClusterUnreachable("cluster: no etcd endpoint answered (" +
                                 "; ".join(e[:200] for e in errors) + ")")

    def txn(self, compares: list[Compare], ops: list[Put | Delete]) -> bool:
        body = {
            "compare": [{"key": _b64(c.key), "result": "EQUAL", "target": "MOD",
                         "mod_revision": str(c.mod_revision)} for c in compares],
            "success": [
                {"request_put": {"key": _b64(o.key), "value": _b64(o.value),
                                 **({"lease": str(o.lease)} if o.lease else {})}}
                if isinstance(o, Put) else {"request_delete_range": {"key": _b64(o.key)}}
                for o in ops],
        }
        return bool(self._post("/kv/txn", body).get("succeeded", False))

    def grant(self, ttl: int) -> int:
        return int(self._post("/lease/grant", {"TTL": ttl, "ID": 0})["ID"])

    def keepalive(self, lease: int) -> int:
        r = self._post("/lease/keepalive", {"ID": lease})
        return int(r.get("result", {}).get("TTL", 0))

    def revoke(self, lease: int) -> None:
        self._post("/kv/lease/revoke", {"ID": lease})

    def member_add(self, peer_url: str) -> list[dict[str, Any]]:
        """Add a member (it must then start with initial-cluster-state=existing): the
        members the cluster has now, the new one included."""
        r = self._post("/cluster/member/add", {"peerURLs": [peer_url]})
        return list(r.get("members", []))


def client_urls(store: EtcdStore) -> list[str]:
    """Every member's client URL, as the cluster lists its members."""
    members = store._post("/cluster/member/list", {}).get("members", [])
    return [u for m in members for u in m.get("clientURLs", [])]


def member_remove(store: EtcdStore, name: str) -> None:
    """Remove member *name*, unless it is the last one (the cluster ends with it)."""
    members = store._post("/cluster/member/list", {}).get("members", [])
    for m in members if len(members) > 1 else []:
        if m.get("name") == name:
            try:
                store._post("/cluster/member/remove", {"ID": m["ID"]})
            except ClusterUnreachable:
                # Asked of the member being removed, the remove can take effect while that
                # member stops before it answers; the others then say "not found". Gone is
                # what was asked: only a member still listed is a failure.
                left = store._post("/cluster/member/list", {}).get("members", [])
                if any(x.get("ID") == m["ID"] for x in left):
                    raise
