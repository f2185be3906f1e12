"""An in-memory Store with etcd's semantics for what cbsd uses: one revision counter, a
key's mod revision, compares on it (0: absent), atomic txns, leases whose keys go when they
lapse (on a clock the test moves), as tests/unit/fakeqemu.py stands in for QEMU."""

from __future__ import annotations

from cbsd.core.cluster.store import KV, ClusterUnreachable, Compare, Delete, Put


class FakeStore:
    def __init__(self) -> None:
        self.kvs: dict[str, KV] = {}
        self.revision = 0
        self.now = 0.0
        self.leases: dict[int, tuple[int, float]] = {}  # id -> (ttl, expires at)
        self.down = False  # True: every call raises ClusterUnreachable
        self.reads = 0

    def _check(self) -> None:
        if self.down:
            raise ClusterUnreachable("cluster: no etcd endpoint answered (fake)")
        for lid, (_, until) in list(self.leases.items()):
            if until <= self.now:
                self._drop_lease(lid)

    def _drop_lease(self, lid: int) -> None:
        del self.leases[lid]
        for k in [k for k, kv in self.kvs.items() if kv.lease == lid]:
            del self.kvs[k]

    def get(self, key: str) -> KV | None:
        self._check()
        self.reads += 1
        return self.kvs.get(key)

    def prefix(self, prefix: str) -> list[KV]:
        self._check()
        self.reads += 1
        return [kv for k, kv in sorted(self.kvs.items()) if k.startswith(prefix)]

    def txn(self, compares: list[Compare], ops: list[Put | Delete]) -> bool:
        self._check()
        for c in compares:
            kv = self.kvs.get(c.key)
            if (kv.mod_revision if kv else 0) != c.mod_revision:
                return False
        self.revision += 1
        for o in ops:
            if isinstance(o, Put):
                if o.lease and o.lease not in self.leases:
                    raise ClusterUnreachable("lease not found (fake)")
                self.kvs[o.key] = KV(o.key, o.value, self.revision, o.lease)
            else:
                self.kvs.pop(o.key, None)
        return True

    def grant(self, ttl: int) -> int:
        self._check()
        lid = len(self.leases) + 1000 + int(self.now * 1000)
        self.leases[lid] = (ttl, self.now + ttl)
        return lid

    def keepalive(self, lease: int) -> int:
        self._check()
        if lease not in self.leases:
            return 0
        ttl = self.leases[lease][0]
        self.leases[lease] = (ttl, self.now + ttl)
        return ttl

    def revoke(self, lease: int) -> None:
        self._check()
        if lease in self.leases:
            self._drop_lease(lease)
