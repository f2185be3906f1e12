"""The workdir layout of the contract (section 2). Pure path arithmetic, no I/O but mkdir."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cbsd.errors import EnvironmentFault, UsageError

HIBERNATION_DIR = "hibernate.ckp"


def plain(name: str, what: str) -> str:
    """*name* as one entry of a folder, or UsageError: defence in depth under every check of
    names (cbsd/names.py, cbsd/specs.py), so that no name -- a VM's, a disk's, a
    checkpoint's -- can ever make a path outside the folder it is joined to."""
    if not name or "/" in name or "\0" in name or name in (".", ".."):
        raise UsageError(f"bad {what} {name!r}: not a plain file name")
    return name


def default_workdir() -> Path:
    env = os.environ.get("CBSD_WORKDIR")
    if env:
        return Path(env).absolute()
    if os.geteuid() == 0:
        return Path("/var/lib/cbsd")
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "cbsd"


@dataclass(frozen=True)
class Workdir:
    root: Path

    @property
    def inventory(self) -> Path:
        return self.root / "var" / "db" / "local.sqlite"

    @property
    def run_dir(self) -> Path:
        """Runtime files of host services cbsd starts (dnsmasq of the managed network)."""
        return self.root / "var" / "run"

    @property
    def locks(self) -> Path:
        return self.root / "var" / "lock"

    @property
    def cluster_config(self) -> Path:
        """This node's cluster configuration (core/cluster/config.py); none: SSH-only mode.
        Known here so that every command can ask cheaply whether it runs on a cluster node
        (cli/quick.py, which loads no pathlib, spells the same path)."""
        return self.root / "cluster" / "config.json"

    def lock_file(self, jname: str) -> Path:
        return self.locks / f"{plain(jname, 'VM name')}.lock"

    def system(self, jname: str) -> Path:
        return self.root / "jails-system" / plain(jname, "VM name")

    def vm_dir(self, jname: str) -> Path:
        return self.root / "vm" / plain(jname, "VM name")

    def disk(self, jname: str, name: str) -> Path:
        return self.vm_dir(jname) / plain(name, "disk name")

    def console_log(self, jname: str) -> Path:
        return self.system(jname) / "console.log"

    def console_sock(self, jname: str) -> Path:
        return self.system(jname) / "console.sock"

    def qmp_sock(self, jname: str) -> Path:
        return self.system(jname) / "qmp.sock"

    def qga_sock(self, jname: str) -> Path:
        return self.system(jname) / "qga.sock"

    def agent_state(self, jname: str) -> Path:
        """What the guest agent last reported (written by cbsd.qemu.agent's helper)."""
        return self.system(jname) / "agent.json"

    def seed(self, jname: str) -> Path:
        """The cloud-init NoCloud seed (holds password hashes and keys: owner-only)."""
        return self.vm_dir(jname) / "seed.iso"

    def pidfile(self, jname: str) -> Path:
        return self.system(jname) / "qemu.pid"

    def qemu_log(self, jname: str) -> Path:
        return self.system(jname) / "qemu.log"

    def checkpoints(self, jname: str) -> Path:
        return self.system(jname) / "checkpoints"

    def checkpoint(self, jname: str, name: str) -> Path:
        return self.checkpoints(jname) / f"{plain(name, 'checkpoint name')}.ckp"

    def ram_file(self, jname: str) -> Path:
        """While the VM runs with vm_ramfile=auto on a filesystem that clones: its guest RAM
        (core/vm/ramfile.py). Holds guest memory: owner-only."""
        return self.system(jname) / "ram"

    def store(self, jname: str) -> Path:
        """The VM's chunk store (storage/chunkstore.py): checkpoints' streams, deduplicated."""
        return self.system(jname) / "store"

    def current_checkpoint(self, jname: str) -> Path:
        """While the VM runs: the checkpoint it descends from (core/checkpoint/tree.py)."""
        return self.system(jname) / "current"

    def moving(self, jname: str) -> Path:
        """While a bmove or bmigrate of the VM is under way or cut short: its intent
        (core/hosts/move.py, core/hosts/migrate.py); the next command on the VM settles it."""
        return self.system(jname) / "moving"

    def releasing(self, jname: str) -> Path:
        """While a saved state is being deleted: its disk snapshots may not be released yet
        (core/vm/states.drop_state); the next command on the VM sweeps them."""
        return self.system(jname) / ".releasing"

    def hibernation(self, jname: str) -> Path:
        return self.system(jname) / HIBERNATION_DIR

    def spec_file(self, jname: str) -> Path:
        """The VM's definition beside its files: the inventory can be rebuilt from these."""
        return self.system(jname) / "vm.json"

    def unfinished(self, jname: str) -> Path:
        """Present while a bcreate or bremove of the VM is under way: the files beside it are
        cbsd's own to delete. Without it, cbsd never deletes files of a VM it has no record
        of (they may be a whole VM whose inventory entry was lost)."""
        return self.system(jname) / ".unfinished"

    def ensure(self) -> None:
        """Create the top of the tree, owner-only (it will hold guest memory). Folders that
        exist keep their mode: the workdir may be a folder cbsd did not create."""
        for d in (self.root, self.inventory.parent, self.locks, self.run_dir,
                  self.root / "jails-system", self.root / "vm"):
            try:
                d.mkdir(parents=True, exist_ok=True, mode=0o700)
            except FileExistsError:
                pass  # not a folder: said below
            except OSError as e:
                raise EnvironmentFault(
                    f"cbsd: cannot use workdir {self.root}: {d} cannot be created "
                    f"({e.strerror or e}); set CBSD_WORKDIR to a folder you can write") from e
            if not d.is_dir():
                raise EnvironmentFault(f"cbsd: cannot use workdir {self.root}: {d} is not a "
                                       "folder; set CBSD_WORKDIR to a folder you can write")
        if os.statvfs(self.root).f_flag & os.ST_RDONLY:
            raise EnvironmentFault(f"cbsd: workdir {self.root} is on a read-only file system: "
                                   "only bls and bcheckpoint mode=list|verify work there")

    def ensure_vm(self, jname: str) -> None:
        for d in (self.system(jname), self.checkpoints(jname), self.vm_dir(jname)):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on *path*'s file system (f_bavail: what
    root keeps in reserve does not count): every free-space check and message uses this."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize
