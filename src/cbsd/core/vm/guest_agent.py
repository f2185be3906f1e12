"""A running VM's guest as cbsd's commands reach it through QEMU: whether its guest agent
listens, the detached helper that waits for the agent (and sets the clock, and runs a script
in the guest), and the guest's address (its agent's report, or cbsd0's DHCP lease).

Apart from core/vm/machine.py (the QEMU process, its monitor, the derived status): none of
this is needed to start, stop or list a VM that is Off, and the agent's module
(cbsd/qemu/agent.py) is imported only when a running VM's agent is asked."""

from __future__ import annotations

from cbsd.core.vm.machine import VM
from cbsd.model import VMSpec
from cbsd.qemu.network import lease_ip
from cbsd.storage.paths import Workdir


def listening(vm: VM) -> bool:
    """Whether a guest agent has the channel open now (QEMU's chardev frontend-open: the
    guest opened org.qemu.guest_agent.0), asked of QEMU, not of the guest: instant."""
    # lazy: only a running VM's agent; bls imports this module for the guest's address
    from cbsd.qemu import agent

    return vm.spec.guest_agent and agent.listening(vm.monitor())


def tend(vm: VM, *, settime: bool, seconds: float, script: str | None = None) -> None:
    """Start the detached helper that waits for the agent (and sets the clock, and runs
    *script* in the guest)."""
    # lazy: only a running VM's agent; bls imports this module for the guest's address
    from cbsd.qemu import agent

    agent.start_helper(vm.paths.qga_sock, vm.ctx.workdir.agent_state(vm.jname), seconds,
                       settime, script)


def ip4(vm: VM) -> str | None:
    """The guest's address: as its agent reports it, or as cbsd0's DHCP server leased it."""
    # lazy: only a running VM's agent; bls imports this module for the guest's address
    from cbsd.qemu.agent import read_state

    addresses = read_state(vm.ctx.workdir.agent_state(vm.jname)).get("ip4") or []
    if addresses:
        return str(addresses[0])
    for address in lease_addresses(vm.ctx.workdir, vm.spec):
        if address:
            return address
    return None


def lease_addresses(workdir: Workdir, spec: VMSpec) -> list[str | None]:
    """Per NIC: the address cbsd0's DHCP server leased its MAC (None: none, or not on
    cbsd0)."""
    db = workdir.inventory.parent
    return [lease_ip(db, n.nic_hwaddr) if n.nic_type == "bridge" and not n.nic_parent
            and n.nic_hwaddr else None for n in spec.nics]
