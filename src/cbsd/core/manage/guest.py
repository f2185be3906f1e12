"""bexec and bscp: a command run in the guest, a file copied into or out of it, through the
guest agent (cbsd/qemu/agent_exec.py). Nothing in the guest but qemu-guest-agent is needed.

bexec runs its command line with /bin/sh -c, as CBSD's bexec hands it to the guest's shell
(over ssh there). bscp takes scp's form, `bscp SRC DST` with one side VM:PATH, and overwrites
the destination as scp does; a copy out of the guest is published on the host by a rename, so
a failed copy leaves no partial file there.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass

from cbsd.core.vm.context import Context
from cbsd.core.vm.machine import VM
from cbsd.errors import QemuError, UsageError
from cbsd.model import Action, require
from cbsd.names import check_name
from cbsd.qemu import agent_exec
from cbsd.qemu.agent import Agent

INSTALL = "install qemu-guest-agent in the guest and start it"
# How long the agent's sync handshake may take before the guest counts as having no agent.
CONNECT_TIMEOUT = 10.0


def _connect(ctx: Context, jname: str) -> Agent:
    vm = VM.load(ctx, jname)
    require(vm.jname, vm.status(), Action.GUEST)
    try:
        return Agent(vm.paths.qga_sock, timeout=CONNECT_TIMEOUT)
    except QemuError as e:
        raise QemuError(f"{jname}: the guest agent does not answer: {INSTALL}") from e


def bexec(ctx: Context, jname: str, cmd: str, timeout: float) -> agent_exec.Finished:
    agent = _connect(ctx, jname)
    try:
        return agent_exec.run(agent, ["/bin/sh", "-c", cmd], timeout)
    except agent_exec.StillRunning as e:
        raise QemuError(f"{jname}: {e} (timeout=); it goes on in the guest") from e
    finally:
        agent.close()


@dataclass(frozen=True)
class Copy:
    jname: str
    guest_path: str
    host_path: str
    into_guest: bool


def parse_copy(words: list[str]) -> Copy:
    """`SRC DST`, exactly one of them VM:PATH (an absolute guest path)."""
    if len(words) != 2:
        raise UsageError(f"bscp: takes a source and a destination, got {len(words)} "
                         "(e.g. 'cbsd bscp ./file vm1:/root/file')")
    remote = [i for i, w in enumerate(words) if ":" in w and not w.startswith(("/", "."))]
    if len(remote) != 1:
        raise UsageError("bscp: exactly one side must be VM:/PATH (e.g. vm1:/root/file); "
                         "write a host path with ':' as ./NAME")
    i = remote[0]
    jname, _, guest_path = words[i].partition(":")
    check_name(jname)
    if not guest_path.startswith("/"):
        raise UsageError(f"bscp: the guest path must be absolute: '{guest_path}'")
    host_path = words[1 - i]
    if not host_path:
        raise UsageError("bscp: the host path is empty")
    return Copy(jname, guest_path, host_path, into_guest=i == 1)


def bscp(ctx: Context, copy: Copy) -> int:
    """-> the number of bytes copied."""
    if copy.into_guest:
        # Opened before the guest is touched: a missing host file leaves the guest alone.
        with open(copy.host_path, "rb") as src:
            agent = _connect(ctx, copy.jname)
            try:
                return agent_exec.write_file(agent, copy.guest_path, src.read)
            finally:
                agent.close()
    host = copy.host_path
    if os.path.isdir(host):
        host = os.path.join(host, os.path.basename(copy.guest_path))
    agent = _connect(ctx, copy.jname)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(host)),
                               prefix=f".{os.path.basename(host)}.")
    try:
        with os.fdopen(fd, "wb") as out:
            n = agent_exec.read_file(agent, copy.guest_path, out.write)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, host)
        return n
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    finally:
        agent.close()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
