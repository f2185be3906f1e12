"""Folding checkpoints' memory streams into the VM's chunk store, off the commands' path.

`bcheckpoint mode=create` writes the stream as ever (that is what makes it fast and safe) and,
once the checkpoint is published and the VM's lock released, starts this as a detached helper
where the VM keeps a chunk store (vm_dedup=auto, guest RAM not a file). The helper holds the
VM's lock as a yielding holder (core/vm/lock.py): any command that needs the VM asks it to stop,
and it gives way within a few milliseconds, leaving its unfinished pack to be collected.

Per checkpoint, in this order (a kill -9 between any two steps leaves the checkpoint whole):
  1. cut `memory` into chunks, append the new ones to a new pack, check the stream it read is
     the one the manifest sealed, flush the pack and rename it into place, read the stream
     back from the store and check it again (Store.read_back);
  2. write `memory.recipe` (atomically) beside `memory`;
  3. seal and write the manifest that names the recipe instead of `memory` (atomically);
  4. delete `memory`.
Until 3, the manifest names `memory`, which is intact; from 3 on, the recipe, whose chunks are
all on disk. Unreferenced packs left by a kill are collected by the next command (`.dirty`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from cbsd import debug
from cbsd.core.vm import recovery
from cbsd.core.vm.context import Context
from cbsd.core.vm.lock import YIELDS, asked_to_yield, yield_file
from cbsd.core.vm.machine import VM
from cbsd.detach import start_detached
from cbsd.errors import BusyError, CbsdError
from cbsd.failpoints import failpoint
from cbsd.storage import ckpstore
from cbsd.storage.atomic import fsync_dir, write_atomic
from cbsd.storage.chunkstore import (
    RECIPE,
    SLOW_NOTICE,
    Store,
    Yielded,
    accelerator_installed,
)
from cbsd.storage.manifest import MEMORY, FileEntry
from cbsd.storage.paths import Workdir, free_bytes

WHAT = f"fold checkpoints into the chunk store {YIELDS}"


def foldable(wd: Workdir, jname: str) -> list[Path]:
    """Published checkpoints whose stream is still a plain `memory` file (oldest first)."""
    return [p for p, m in ckpstore.list_states(wd.checkpoints(jname))
            if m is not None and not m.folded and not m.ram_file and MEMORY in m.files
            and not m.migration.get("capabilities") and not p.name.startswith(".")]


def fold_vm(wd: Workdir, jname: str) -> list[str]:
    """Fold every foldable checkpoint of *jname*; returns the names folded. Gives way (returns
    early) when another command wants the VM; does nothing if the VM is busy."""
    ctx = Context(wd)
    pending = foldable(wd, jname)
    if not pending or free_bytes(wd.system(jname)) < 2 * max(
            ckpstore.read_manifest(p).memory_size for p in pending):
        return []  # nothing to do, or a nearly full disk: a fold would only make it fuller
    try:
        lock = ctx.lock(jname, WHAT)
    except BusyError:
        return []  # a command holds the VM; it starts another fold when it is done, if needed
    done: list[str] = []
    with lock:
        if YIELDS not in Path(wd.lock_file(jname)).read_text():
            return []  # the lock file could not say we yield (a full disk): others would wait
        Path(yield_file(wd.lock_file(jname))).unlink(missing_ok=True)  # a stale request

        recovery.recover(VM.load(ctx, jname), lock.died)
        failpoint("fold:locked")
        store = Store(wd.store(jname))
        try:
            for ckdir in foldable(wd, jname):
                if not fold_one(store, ckdir, lambda: asked_to_yield(wd.lock_file(jname))):
                    continue
                done.append(ckpstore.state_name(ckdir))
        except Yielded:
            return done
        if store.dirty():
            known = ckpstore.recipes(wd.system(jname))
            if known is not None:
                store.collect(known)
    return done


def fold_one(store: Store, ckdir: Path, should_yield: Callable[[], bool]) -> bool:
    """Steps 1-4 for one checkpoint; False if its stream does not match its seal (left as it
    is: verify reports it)."""
    m = ckpstore.read_manifest(ckdir)
    entry = m.files[MEMORY]
    known = ckpstore.recipes(ckdir.parent.parent) or []
    recipe, digest = store.fold(ckdir / MEMORY, known, should_yield)
    if recipe.size != entry.size or digest != entry.xxh3_128:
        return False
    failpoint("fold:written")
    # The stream is deleted in step 4: its chunked copy must read back whole first.
    store.read_back(recipe, entry.xxh3_128, should_yield)
    failpoint("fold:packed")
    data = recipe.to_bytes()
    write_atomic(ckdir / RECIPE, data)
    failpoint("fold:recipe")
    # lazy: a C extension only a fold hashes with; bcheckpoint list imports this module
    import xxhash

    m.files = {**{k: v for k, v in m.files.items() if k != MEMORY},
               RECIPE: FileEntry(len(data), xxhash.xxh3_128_hexdigest(data))}
    m.stream = entry
    ckpstore.save_manifest(m, ckdir)
    fsync_dir(ckdir)
    failpoint("fold:sealed")
    (ckdir / MEMORY).unlink()
    fsync_dir(ckdir)
    return True


def start_helper(wd: Workdir, jname: str) -> None:
    """Run fold_vm detached: it outlives the command, which does not wait for it."""
    if not accelerator_installed():  # the fold's own notice goes nowhere: say it here
        print(SLOW_NOTICE, file=sys.stderr, flush=True)
    src = str(Path(__file__).resolve().parents[2])
    argv = [sys.executable, "-I", "-c",
            f"import sys; sys.path.insert(0, {src!r}); from cbsd.core.checkpoint.fold import main; "
            "sys.exit(main(sys.argv[1:]))", str(wd.root), jname]
    if debug.ON:
        debug.log("proc", " ".join(argv) + " &")
    start_detached(argv)


def main(args: list[str]) -> int:
    try:
        fold_vm(Workdir(Path(args[0])), args[1])
    except (CbsdError, OSError):
        return 1
    return 0
