"""The commands that reach inside a running guest: blogin (its serial console), bexec and bscp
(through its guest agent). bexec passes the guest command's exit code through, so cbsd's own
failures are told apart by their line's 'cbsd:' prefix."""

from __future__ import annotations

import sys
from typing import Any

from cbsd.core.vm.context import Context
from cbsd.errors import CbsdError, UsageError, describe
from cbsd.model import Action, require

Args = dict[str, Any]


def blogin(ctx: Context, a: Args) -> int:
    # lazy: only blogin needs the terminal (termios, tty)
    from cbsd.cli.console import attach

    # lazy: main.handler imports this module for every command: the VM's module only here
    from cbsd.core.vm.machine import VM

    vm = VM.load(ctx, a["jname"])
    require(vm.jname, vm.status(), Action.LOGIN)
    return attach(vm.paths.console_sock, vm.jname)


def _own_failure(e: BaseException) -> int:
    """bexec/bscp: cbsd's own failure, told apart from the guest command's by its line's
    'cbsd:' prefix (the exit code alone cannot: the guest's may be 1 or 2 too)."""
    message, code = describe(e)
    sys.stderr.write(message if message.startswith("cbsd:") else f"cbsd: {message}")
    sys.stderr.write("\n")
    return code


def bexec(ctx: Context, a: Args) -> int:
    # lazy: only bexec/bscp talk to the guest agent
    from cbsd.core.manage import guest

    try:
        cmd = a["cmd"] if a["cmd"] is not None else " ".join(a.get("extra", []))
        if a["cmd"] is not None and a.get("extra"):
            raise UsageError("bexec: give the command as cmd= or as words, not both")
        if not cmd.strip():
            raise UsageError("bexec: no command (cmd='...')")
        done = guest.bexec(ctx, a["jname"], cmd, float(a["timeout"]))
    except Exception as e:  # every failure of cbsd's own is one "cbsd:" line
        return _own_failure(e)
    sys.stdout.flush()
    sys.stdout.buffer.write(done.out)
    sys.stdout.buffer.flush()
    sys.stderr.buffer.write(done.err)
    sys.stderr.buffer.flush()
    if done.truncated:
        return _own_failure(CbsdError("the guest agent kept only the first 16 MiB of "
                                            "the output; redirect it to a file and bscp that"))
    return done.exitcode


def bscp(ctx: Context, a: Args) -> int:
    # lazy: only bexec/bscp talk to the guest agent
    from cbsd.core.manage import guest

    try:
        guest.bscp(ctx, guest.parse_copy(a.get("extra", [])))
    except Exception as e:  # every failure of cbsd's own is one "cbsd:" line
        return _own_failure(e)
    return 0
