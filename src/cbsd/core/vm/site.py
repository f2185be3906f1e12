"""What a VM needs of the place it lives in: its workdir, the inventory, the host's QEMU, the
locks. core/vm/context.Context is the one real Site; a unit test builds a VM from a stub.

A Protocol rather than Context itself so that nothing in this package imports context.py
(which imports recovery, which imports the VM): the package's imports go one way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from cbsd.core.vm.lock import VMLock
    from cbsd.model import VMSpec
    from cbsd.qemu.host import Host
    from cbsd.storage.inventory import Inventory
    from cbsd.storage.paths import Workdir


class Site(Protocol):
    @property
    def workdir(self) -> Workdir: ...

    @property
    def inventory(self) -> Inventory: ...

    @property
    def host(self) -> Host: ...

    def spec(self, jname: str) -> VMSpec: ...

    def lock(self, jname: str, what: str, wait: float = 0.0, *, vm: bool = True
             ) -> VMLock: ...
