"""The VM generation ID (QEMU's vmgenid device): a new one for every fork of a guest's state.

A guest that runs on from a saved state may already have run on from it before (a checkpoint
restored twice, a clone continuing from a copied checkpoint, an imported state whose original
lives on): two guests with the same random-number state, which then make the same keys and
nonces. The vmgenid device tells the guest it is such a fork: Linux 5.18+ (drivers/virt/
vmgenid.c) mixes the new ID into its pool and reseeds at once ("crng reseeded due to virtual
machine fork"), Windows gives it to applications.

Mechanism (measured on QEMU 7.2 and 10): a running QEMU refuses to change the ID (qom-set
"guid": "Attempt to set property ... after it was realized"), but at the end of every load
QEMU writes the incoming command line's guid= into guest memory and raises the ACPI
notification (vmgenid's post_load). So the load decides the ID on QEMU's command line:
"auto" (a new random one) for every fork, the saved one for the VM's own hibernation image,
which is the same guest continuing and never ran past that point; the guest sees an
unchanged ID and does nothing. After the load, while the guest is still paused, the ID QEMU
holds is checked against that decision (query-vm-generation-id).

Whether a state has the device at all is the state's, never the VM's current settings: the
device's state is in the stream, and QEMU refuses a stream with a section its command line
lacks. The manifest's restore_relevant holds "vmgenid": True for a state saved with it (an
older cbsd, which cannot add the device, refuses such a state as incompatible instead of
failing inside QEMU); a state saved without it loads without it, whatever vm_genid says.
"""

from __future__ import annotations

from pathlib import Path

from cbsd import debug
from cbsd.core.vm.machine import VM
from cbsd.errors import QemuError
from cbsd.model import GENID_KEY
from cbsd.qemu.qmp import Monitor
from cbsd.storage import ckpstore

# The ID a hibernation image's guest held, beside the image and outside its manifest: the
# image's own folder here. bexport/bmove carry only the files a manifest lists, so a
# hibernation image that arrived from elsewhere has none and its resume is a fork.
OWN = "generation"
RECORD = "genid"  # the manifest's migration[RECORD]: the ID when saved, for the record


def current(vm: VM, mon: Monitor) -> str | None:
    """The generation ID the running guest holds, or None if its QEMU has no vmgenid."""
    if not vm.uses_genid():
        return None
    return str(mon.cmd("query-vm-generation-id")["guid"])


def record(vm: VM, mon: Monitor, m: ckpstore.Manifest, folder: Path) -> None:
    """Note in manifest *m* (being written in *folder*) whether the state has the device."""
    guid = current(vm, mon)
    m.argv = vm.argv(incoming=True, ram_file=m.ram_file,
                     generation=None if guid is None else "auto")
    if guid is None:
        return
    m.restore_relevant[GENID_KEY] = True
    m.migration[RECORD] = guid
    if m.kind == "hibernation":
        (folder / OWN).write_text(guid + "\n")


def for_load(ckdir: Path, m: ckpstore.Manifest, *, fork: bool) -> str | None:
    """The guid= the loading QEMU gets: None (the state has no device), the saved ID (the
    VM's own hibernation image, not a fork), or "auto" (a new ID)."""
    if not m.restore_relevant.get(GENID_KEY):
        return None
    if not fork:
        try:
            own = (ckdir / OWN).read_text().strip()
        except OSError:
            own = ""
        if own and own == m.migration.get(RECORD):
            return own
    return "auto"


def check_loaded(vm: VM, mon: Monitor, m: ckpstore.Manifest, generation: str | None) -> None:
    """After the load, before the guest runs: the ID QEMU gave the guest is the one decided."""
    if generation is None:
        return
    guid = str(mon.cmd("query-vm-generation-id")["guid"])
    saved = m.migration.get(RECORD)
    if debug.ON:
        debug.log("genid", f"{vm.jname}: saved {saved}, now {guid}")
    if (guid != generation) if generation != "auto" else (guid == saved):
        raise QemuError(f"{vm.jname}: the guest's generation ID is {guid} after the load, "
                        f"expected {'a new one' if generation == 'auto' else generation}")
