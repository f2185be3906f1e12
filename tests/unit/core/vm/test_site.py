"""A VM needs only a Site (core/vm/site.py) -- workdir, inventory, host, spec, lock -- not the
Context that runs recovery: built here from a stub, with no inventory file and no QEMU."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from cbsd.core.vm.lock import VMLock
from cbsd.core.vm.machine import VM
from cbsd.errors import StateError
from cbsd.model import VMSpec
from cbsd.storage.paths import Workdir


class StubInventory:
    """What a VM asks of the inventory: its recorded pid and VNC port, and recording them."""

    def __init__(self) -> None:
        self.runtime_of: dict[str, tuple[int, int]] = {}

    def runtime(self, jname: str) -> tuple[int, int]:
        return self.runtime_of.get(jname, (0, 0))

    def set_runtime(self, jname: str, pid: int, vnc_port: int = 0) -> None:
        self.runtime_of[jname] = (pid, vnc_port)


@dataclasses.dataclass
class StubSite:
    workdir: Workdir
    inventory: Any
    specs: dict[str, VMSpec]

    @property
    def host(self) -> Any:
        raise AssertionError("nothing here may probe the host")

    def spec(self, jname: str) -> VMSpec:
        return self.specs[jname]

    def lock(self, jname: str, what: str, wait: float = 0.0) -> VMLock:
        return VMLock(self.workdir.lock_file(jname), jname, what).acquire(wait)


@pytest.fixture()
def site(tmp_path: Path) -> StubSite:
    wd = Workdir(tmp_path)
    wd.ensure()
    spec = VMSpec(jname="a", ram=64 << 20, disks=["dsk1.qcow2", "data.qcow2"], efi="uefi")
    return StubSite(wd, StubInventory(), {"a": spec})


def test_a_vm_is_built_from_a_stub_site(site: StubSite) -> None:
    site.inventory.runtime_of["a"] = (4242, 5901)
    vm = VM.load(site, "a")
    assert (vm.pid, vm.vnc_port) == (4242, 5901)
    assert [(i.name, i.node) for i in vm.images()] == [
        ("dsk1.qcow2", "disk0"), ("data.qcow2", "disk1"), ("efivars.qcow2", "efi-vars")]
    assert vm.paths.qmp_sock == str(site.workdir.qmp_sock("a"))
    assert not vm.alive()  # pid 4242 is not a QEMU with this VM's socket


def test_a_vm_from_a_stub_site_checks_its_images(site: StubSite) -> None:
    """The launch's first check (no image may name another file) runs on the stub too."""
    vm = VM.load(site, "a")
    folder = Path(vm.paths.disks[0]).parent
    folder.mkdir(parents=True)
    for image in vm.images():
        Path(image.path).write_bytes(b"not a qcow2")
    with pytest.raises(StateError, match=r"a: dsk1\.qcow2"):
        vm.check_images()
