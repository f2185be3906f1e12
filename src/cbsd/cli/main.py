"""cbsd's entry point: the only place where errors become exit codes."""

from __future__ import annotations

import os
import sys

from cbsd import __version__, cancel
from cbsd.errors import EXIT_FAILED, EXIT_USAGE, Cancelled, UsageError, describe

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from types import FrameType
    from typing import Any

    from cbsd.core.vm.context import Context

USAGE = """usage: cbsd COMMAND [key=value ...] [NAME ...]

commands:
{commands}

'cbsd COMMAND --help' shows a command's keys. Exit codes: 0 ok, 1 failed, 2 bad arguments,
75 the VM is busy with another cbsd command."""


def _usage() -> str:
    # lazy: --version and the pause lane skip the command table
    from cbsd.cli.table import COMMANDS

    return USAGE.format(commands="\n".join(f"  {c.name:<12} {c.summary}"
                                           for c in COMMANDS.values()))


def _cancel_on_signals() -> None:
    """SIGINT/SIGTERM raise Cancelled once, so operations roll back; repeats are ignored while
    the rollback runs (a second Ctrl-C must not leave things half undone)."""
    # lazy: signal loads enum: the pause lane returns before this
    import signal

    fired = False

    def handler(signum: int, frame: FrameType | None) -> None:
        nonlocal fired
        if fired:
            return
        fired = True
        reason = f"cancelled by {signal.Signals(signum).name}"
        cancel.request(reason)  # worker threads see it at their next check
        raise Cancelled(reason)

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def handler(command: str) -> Callable[[Context, dict[str, Any]], int]:
    """The function that carries out *command*: cli/hosts.py for the commands that reach other
    hosts, cli/guest.py for those that reach inside a guest, cli/devices.py for a VM's disks
    and NICs, cli/snapshots.py for bsnapshot, cli/serve.py for the service's,
    cli/commands.py for the rest."""
    # lazy: only a command that runs: --help and completion skip them
    from cbsd.cli import commands, devices, guest, hosts, serve, snapshots

    name = command.replace("-", "_")
    fn: Callable[[Context, dict[str, Any]], int] = getattr(hosts, name, None) or \
        getattr(guest, name, None) or getattr(devices, name, None) or \
        getattr(snapshots, name, None) or getattr(serve, name, None) or getattr(commands, name)
    return fn


def _auto_node(parsed: dict[str, Any], args: list[str]) -> tuple[str | None, list[str]]:
    """bcreate node=auto on a cluster node: the live node with the most free memory for the
    VM's vm_ram (one read of etcd); None (here) when that is this node. The command is then
    forwarded as node=N is, to the `cbsd node` of that name."""
    # lazy: only node=auto
    from cbsd.core.cluster import admin, config

    # lazy: only node=auto
    from cbsd.core.vm.context import Context

    ctx = Context(writable=False)
    cfg = config.load(ctx.workdir)
    if cfg is None:
        raise UsageError("bcreate: node=auto needs a cluster ('cbsd bcluster'): this host is "
                         "not a node of one")
    chosen = admin.pick(ctx, int(parsed["vm_ram"]))
    rest = [w for w in args if w != "node=auto"]
    return (None if chosen == cfg.node else chosen), rest


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    os.umask(0o077)  # everything cbsd or its QEMU creates is owner-only: it may hold guest RAM
    if not args:
        print(_usage(), file=sys.stderr)
        return EXIT_USAGE
    if args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if args[0] in ("-V", "--version", "version"):
        print(f"cbsd {__version__}")
        return 0
    if args[0] == "__complete" and len(args) >= 2:  # for contrib/bash-completion/cbsd
        # lazy: only shell completion
        from cbsd.cli.complete import candidates

        print("\n".join(candidates(args[1], args[2:])))
        return 0
    try:
        if args[0] == "bpause":
            # lazy: only bpause tries the quick lane
            from cbsd.cli.quick import bpause

            code = bpause(args[1:])
            if code is not None:
                return code
        # lazy: the pause lane and --version skip the argument tables
        from cbsd.cli.args import help_text, parse

        # lazy: --version and the pause lane skip the command table
        from cbsd.cli.table import COMMANDS

        cmd = COMMANDS.get(args[0])
        if cmd is None:
            raise UsageError(f"unknown command '{args[0]}' (see 'cbsd --help')")
        if any(a in ("-h", "--help") for a in args[1:]):
            print(help_text(cmd))
            return 0
        parsed = parse(cmd, args[1:])
        if cmd.name == "bcreate" and parsed.get("node") == "auto":
            parsed["node"], args = _auto_node(parsed, args)
        if parsed.get("node") and cmd.name not in ("bls", "bmove", "bmigrate", "node") and \
                (cmd.name, parsed.get("mode")) != ("bcheckpoint", "replicate"):
            # lazy: only node= forwarding
            from cbsd.core.hosts import nodes

            # lazy: only a command that runs: 'CMD --help' skips the workdir
            from cbsd.core.vm.context import Context

            rest = [w for w in args[1:] if not w.startswith("node=")]
            return nodes.forward(Context(writable=False), parsed["node"], [args[0], *rest])
        _cancel_on_signals()
        # lazy: only a command that runs: 'CMD --help' skips the workdir
        from cbsd.core.vm.context import Context

        ctx = Context(writable=cmd.writes(parsed))
        if ctx.workdir.cluster_config.is_file():
            # lazy: only a cluster node installs the ownership guard
            from cbsd.core.cluster import admin

            admin.install(ctx)
        return int(handler(cmd.name)(ctx, parsed))
    except BrokenPipeError:
        # Only a closed stdout (`cbsd bls | head -1`) gets here silently; anything else that
        # breaks a pipe is turned into a CbsdError with a message where it happens.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILED
    except BaseException as e:  # everything, SystemExit included, becomes one line
        if isinstance(e, SystemExit) and e.code in (None, 0):
            return 0
        message, code = describe(e)
        print(message, file=sys.stderr)
        return code
