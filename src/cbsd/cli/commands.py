"""Command handlers: turn parsed arguments into core calls and print the results."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable
from typing import Any, TextIO

from cbsd import cancel
from cbsd.cli import output
from cbsd.cli.args import show_value
from cbsd.core.vm.context import Context
from cbsd.errors import CheckpointError, NoSuchVM, UsageError, describe
from cbsd.model import HA_KEYS
from cbsd.names import is_mask, match_mask

Args = dict[str, Any]


def each(ctx: Context, vms: list[str], fn: Callable[[Context, str], str | None],
         parallel: int = 1) -> int:
    """Run *fn* on every VM, report each result, exit non-zero if any failed."""
    lock = threading.Lock()

    def report(text: str, stream: TextIO) -> None:
        # One write per line under a lock: print() writes text and newline separately, and
        # parallel workers would interleave them.
        with lock:
            stream.write(text + "\n")
            stream.flush()

    def one(jname: str) -> int:
        try:
            # SQLite connections are per thread: a worker gets its own context.
            local = (ctx if parallel == 1 or len(vms) == 1
                     else Context(ctx.workdir, writable=ctx.writable))
            cancel.check()  # after SIGINT/SIGTERM, VMs not yet begun are left alone
            msg = fn(local, jname)
        except Exception as e:  # one VM's failure, whatever it is, is one line; others go on
            message, code = describe(e)
            report(message, sys.stderr)
            return code
        if msg:
            report(msg, sys.stdout)
        return 0

    if parallel > 1 and len(vms) > 1:
        # lazy: only parallel= runs threads (concurrent.futures ~10 ms)
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=parallel,
                                initializer=_main_thread_gets_signals) as pool:
            codes = list(pool.map(one, vms))
    else:
        codes = [one(v) for v in vms]
    failed = {c for c in codes if c}
    return 0 if not failed else failed.pop() if len(failed) == 1 else 1


def _main_thread_gets_signals() -> None:
    """Workers block SIGINT/SIGTERM so the kernel delivers them to the main thread, whose
    handler then runs at once and tells every worker to cancel (cbsd.cancel)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})


def only_in_modes(args: Args, mode: str, allowed: dict[str, tuple[str, ...]], defaults: Args,
          command: str = "bcheckpoint") -> None:
    """Reject keys that mean nothing for this mode instead of silently ignoring them."""
    for key, default in defaults.items():
        if args.get(key) != default and mode not in allowed[key]:
            raise UsageError(f"{command}: {key}= is not used with mode={mode}")


def bcreate(ctx: Context, a: Args) -> int:
    # lazy: each command loads its own core module; bls skips lifecycle
    from cbsd.core.manage import lifecycle

    spec = lifecycle.create_from_keys(ctx, a)
    print(f"{spec.jname}: created")
    if a["runasap"]:
        print(lifecycle.start(ctx, spec.jname))
    return 0


def _targets(ctx: Context, a: Args) -> list[str]:
    """The VMs a command acts on: names and masks resolved, then narrowed for host boot
    (boot=1) or shutdown (running_only=1) where the command has those keys."""
    # lazy: each command loads its own core module; bls skips lifecycle
    from cbsd.core.manage import lifecycle

    narrowed = bool(a.get("boot") or a.get("running_only"))
    vms = ctx.resolve(a["names"], may_be_empty=narrowed)
    if narrowed:
        vms = lifecycle.select(ctx, vms, boot=bool(a.get("boot")),
                               running=bool(a.get("running_only")))
    return vms


def bstart(ctx: Context, a: Args) -> int:
    # lazy: each command loads its own core module; bls skips lifecycle
    from cbsd.core.manage import lifecycle

    return each(ctx, _targets(ctx, a), lambda c, j: lifecycle.start(
        c, j, checkpoint=a["checkpoint"], paused=a["paused"]), a["parallel"])


def bstop(ctx: Context, a: Args) -> int:
    # lazy: each command loads its own core module; bls skips lifecycle
    from cbsd.core.manage import lifecycle

    if a["checkpoint"]:
        return _hibernate_on_stop(ctx, a)
    return each(ctx, _targets(ctx, a), lambda c, j: lifecycle.stop(
        c, j, noacpi=a["noacpi"], hard_timeout=a["hard_timeout"]), a["parallel"])


def _hibernate_on_stop(ctx: Context, a: Args) -> int:
    """bstop checkpoint=1, CBSD's way to stop with the guest's state kept: the VM is
    hibernated exactly as by bsuspend (Suspended after; bstart resumes it)."""
    # lazy: only bstop checkpoint=1 loads the save engine
    from cbsd.core.checkpoint import hibernate

    for key, default in (("noacpi", False), ("hard_timeout", 30)):
        if a[key] != default:
            raise UsageError(f"bstop: {key}= is not used with checkpoint=1 (the VM is "
                             "hibernated, not shut down)")
    return each(ctx, _targets(ctx, a), lambda c, j: hibernate.suspend(
        c, j, progress=output.progress(f"{j}: saving")), a["parallel"])


def brestart(ctx: Context, a: Args) -> int:
    # lazy: each command loads its own core module; bls skips lifecycle
    from cbsd.core.manage import lifecycle

    return each(ctx, ctx.resolve(a["names"]), lambda c, j: lifecycle.restart(
        c, j, noacpi=a["noacpi"], hard_timeout=a["hard_timeout"]), a["parallel"])


def bremove(ctx: Context, a: Args) -> int:
    # lazy: each command loads its own core module; bls skips lifecycle
    from cbsd.core.manage import lifecycle

    return each(ctx, ctx.resolve(a["names"]), lifecycle.remove)


def bregister(ctx: Context, a: Args) -> int:
    # lazy: each command loads its own core module; bls skips registry
    from cbsd.core.manage import registry

    found: list[str] = []
    candidates = registry.unregistered(ctx)
    for mask in a["names"]:
        hits = match_mask(mask, candidates) if is_mask(mask) else [mask]
        if not hits:
            raise NoSuchVM(f"No unregistered VM matches the mask: {mask}")
        found += [h for h in hits if h not in found]
    return each(ctx, found, registry.register)


def bunregister(ctx: Context, a: Args) -> int:
    # lazy: each command loads its own core module; bls skips registry
    from cbsd.core.manage import registry

    return each(ctx, ctx.resolve(a["names"]), registry.unregister)


def bset(ctx: Context, a: Args) -> int:
    # lazy: only bset/bget/brename/bclone; bls and bstart skip it
    from cbsd.core.manage import settings as manage

    changes = {k: v for k, v in a.items() if k in manage.SETTABLE and v is not None}
    if any(k in changes for k in HA_KEYS):
        # lazy: only the ha keys ask the cluster (its etcd client)
        from cbsd.core.cluster import ship

        ship.check_settings(ctx, changes)
    return each(ctx, ctx.resolve(a["names"]), lambda c, j: manage.set_(c, j, changes))


def bget(ctx: Context, a: Args) -> int:
    # lazy: only bset/bget/brename/bclone; bls and bstart skip it
    from cbsd.core.manage import settings as manage

    values = manage.get(ctx, a["jname"])
    wanted = [*([a["key"]] if a["key"] else []), *a.get("extra", [])]
    unknown = [k for k in wanted if k not in values]
    if unknown:
        raise UsageError(f"bget: unknown setting '{unknown[0]}' (settings: "
                         f"{', '.join(values)})")
    if a["format"] == "json":
        sys.stdout.write(output.as_json({k: values[k] for k in wanted} if wanted else values))
    elif len(wanted) == 1:
        print(show_value(values[wanted[0]], none=""))
    else:
        for k in wanted or values:
            print(f"{k}: {show_value(values[k], none='')}")
    return 0


def brename(ctx: Context, a: Args) -> int:
    # lazy: only bset/bget/brename/bclone; bls and bstart skip it
    from cbsd.core.manage import settings as manage

    print(manage.rename(ctx, a["old"], a["new"]))
    return 0


def bclone(ctx: Context, a: Args) -> int:
    # lazy: only bset/bget/brename/bclone; bls and bstart skip it
    from cbsd.core.manage import settings as manage

    names = manage.clone(ctx, a["old"], a["new"], a["checkpoint"], a["count"])
    print(f"{a['old']}: cloned to {', '.join(names)}"
          + (f" with checkpoint {a['checkpoint']}" if a["checkpoint"] else ""))
    if not a["start"]:
        return 0
    # lazy: each command loads its own core module; bls skips lifecycle
    from cbsd.core.manage import lifecycle

    return each(ctx, names, lambda c, j: lifecycle.start(c, j, checkpoint=a["checkpoint"]),
                a["parallel"])


def bpause(ctx: Context, a: Args) -> int:
    # lazy: each command loads its own core module; bls skips lifecycle
    from cbsd.core.manage import lifecycle

    return each(ctx, ctx.resolve(a["names"]), lambda c, j: lifecycle.pause(c, j, a["mode"]))


def bmetrics(ctx: Context, a: Args) -> int:
    # lazy: only bmetrics loads prometheus_client (the CLI's start stays light)
    from cbsd.service import metrics

    sys.stdout.write(metrics.exposition(lambda: ctx.workdir).decode())
    return 0


def bcheckpoint(ctx: Context, a: Args) -> int:
    # lazy: only bcheckpoint loads the checkpoint engine
    from cbsd.core.checkpoint import checkpoints

    mode = a["mode"]
    only_in_modes(a, mode, {"name": ("create", "destroy", "verify"), "poweroff": ("create",),
                    "live": ("create",), "keep": ("create",), "format": ("list",),
                    "node": ("replicate",)},
          {"name": None, "poweroff": False, "live": False, "keep": None, "format": "text",
           "node": None})
    if mode == "replicate":
        # lazy: only replication loads the cluster's code (and its etcd client)
        from cbsd.core.cluster import ship

        return each(ctx, ctx.resolve(a["names"]), lambda c, j: ship.replicate(c, j, a["node"]))
    if mode == "create":
        name = a["name"] or "checkpoint"
        return each(ctx, ctx.resolve(a["names"]), lambda c, j: checkpoints.create(
            c, j, name, poweroff=a["poweroff"], live=a["live"], keep=a["keep"],
            progress=output.progress(f"{j}: saving")))
    if mode == "destroy":
        if not a["name"]:
            raise UsageError("bcheckpoint: mode=destroy needs name= (or use mode=destroyall)")
        return each(ctx, ctx.resolve(a["names"]), lambda c, j: checkpoints.destroy(c, j, a["name"]))
    if mode == "destroyall":
        return each(ctx, ctx.resolve(a["names"]), checkpoints.destroyall)
    if mode == "verify":
        return each(ctx, ctx.resolve(a["names"]), lambda c, j: _verify(c, j, a["name"]))
    vms = ctx.resolve(a["names"])
    if a["format"] == "json":
        data = [{"jname": j, **ck} for j in vms for ck in checkpoints.listing(ctx, j)]
        sys.stdout.write(output.as_json(data))
        return 0
    for j in vms:
        lines = checkpoints.tree_lines(ctx, j, checkpoints.listing(ctx, j))
        print(f"Created checkpoint for {j}:" + ("" if lines else " none"))
        for line in lines:
            print(line)
    return 0


def bschedule(ctx: Context, a: Args) -> int:
    # lazy: only bschedule reads the clock
    from cbsd import clock

    # lazy: only bschedule loads the schedule's runner (and, through it, croniter)
    from cbsd.core.manage import schedule

    names = ctx.resolve(a["names"]) if a["names"] else None
    failed = set()
    for o in schedule.run_due(ctx, clock.now(), names):
        for line in o.lines:
            print(line, flush=True)
        if o.error:
            print(o.error[0], file=sys.stderr, flush=True)
            failed.add(o.error[1])
    return 0 if not failed else failed.pop() if len(failed) == 1 else 1


def _verify(ctx: Context, jname: str, name: str | None) -> str:
    # lazy: only bcheckpoint loads the checkpoint engine
    from cbsd.core.checkpoint import checkpoints

    results = checkpoints.verify(ctx, jname, name)
    bad = [msg for _, msg in results if msg]
    lines = [f"{jname}: checkpoint {ck}: OK" for ck, msg in results if not msg]
    if bad:
        if lines:
            print("\n".join(lines))
        raise CheckpointError(f"{jname}: " + "; ".join(bad))
    return "\n".join(lines) or f"{jname}: no checkpoints"


def bsuspend(ctx: Context, a: Args) -> int:
    # lazy: only bsuspend loads the checkpoint engine
    from cbsd.core.checkpoint import hibernate

    if a["mode"] == "discard":
        if a["running_only"]:
            raise UsageError("bsuspend: running_only= is not used with mode=discard")
        return each(ctx, ctx.resolve(a["names"]), hibernate.discard)
    return each(ctx, _targets(ctx, a), lambda c, j: hibernate.suspend(
        c, j, progress=output.progress(f"{j}: saving")), a["parallel"])


