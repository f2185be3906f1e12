"""Which NICs a forking restore renews (core/checkpoint/identity.py): each whose definition MAC
differs from the one the saved state holds for that NIC, read from a new manifest's `nics` or
an older one's single-NIC keys; a NIC whose saved MAC is not known is never renewed."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from cbsd.core.checkpoint.identity import nics_to_renew, saved_macs
from cbsd.model import Nic

A, B, C, D = (f"52:54:00:00:00:0{i}" for i in range(1, 5))


def manifest(spec: dict[str, Any]) -> Any:
    return SimpleNamespace(spec={"jname": "vm1", "ram": 1 << 27, **spec})


def vm(*macs: str) -> Any:
    return SimpleNamespace(spec=SimpleNamespace(nics=[Nic(nic_hwaddr=m) for m in macs]))


def test_saved_macs_from_new_and_old_manifests() -> None:
    assert saved_macs(manifest({"nics": [{"nic_type": "user", "nic_hwaddr": A},
                                         {"nic_type": "bridge", "nic_hwaddr": B}]})) == [A, B]
    assert saved_macs(manifest({"nic": "bridge", "mac": A})) == [A]  # before several NICs
    assert saved_macs(manifest({"nic": "none"})) == []
    assert saved_macs(manifest({})) == []  # nothing says: nothing is known


def test_each_nic_that_differs_is_renewed_and_only_on_a_fork() -> None:
    two = manifest({"nics": [{"nic_hwaddr": A}, {"nic_hwaddr": B}]})
    assert nics_to_renew(vm(C, D), two, fork=True) == [0, 1]
    assert nics_to_renew(vm(A, D), two, fork=True) == [1]
    assert nics_to_renew(vm(A.upper(), B), two, fork=True) == []
    assert nics_to_renew(vm(C, D), two, fork=False) == []
    assert nics_to_renew(vm(C), manifest({"nic": "user", "mac": A}), fork=True) == [0]
    assert nics_to_renew(vm(A), manifest({"nic": "user", "mac": A}), fork=True) == []
    # No saved MAC found (a manifest without NIC keys): never "differs".
    assert nics_to_renew(vm(C, D), manifest({}), fork=True) == []
    # A NIC without a MAC in the definition keeps QEMU's default: nothing to give it.
    assert nics_to_renew(vm(""), two, fork=True) == []
