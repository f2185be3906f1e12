"""cbsd(8), generated from the same registry that parses the arguments and prints --help
(cli/table.py): one source for both.

    python -m cbsd.cli.manpage > cbsd.8
"""

from __future__ import annotations

import sys

from cbsd import __version__
from cbsd.cli.args import Command, show_value
from cbsd.cli.table import COMMANDS


def _roff(text: str) -> str:
    out = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(("\\&" + ln) if ln.startswith((".", "'")) else ln
                     for ln in out.splitlines())


def _command(cmd: Command) -> list[str]:
    lines = [f".SS {cmd.name}", _roff(cmd.summary), ".PP", ".B cbsd " + cmd.name]
    if cmd.details:
        lines += [".PP", _roff(cmd.details)]
    for k in cmd.keys:
        lines.append(".TP")
        lines.append(f".BR {k.name} =")
        if k.alias_of:
            lines.append(_roff(f"alias of {k.alias_of}="))
            continue
        default = "required" if k.required else f"default: {show_value(k.default)}"
        choices = f" ({'|'.join(k.choices)})" if k.choices and k.kind == "enum" else ""
        lines.append(_roff(f"{k.help}{choices} [{default}]"))
    lines += [".PP", "Example:", ".RS", ".B " + _roff(cmd.example), ".RE"]
    return lines


def render() -> str:
    lines = [f'.TH CBSD 8 "" "cbsd {__version__}" "System Manager\'s Manual"',
             ".SH NAME", "cbsd \\- CBSD's VM manager, on QEMU: checkpoints, hibernation, pause",
             ".SH SYNOPSIS", ".B cbsd", ".I COMMAND", "[\\fIkey\\fR=\\fIvalue\\fR ...] "
             "[\\fINAME\\fR ...]", ".SH DESCRIPTION",
             _roff("Arguments are key=value pairs in any order; bare words are VM names. "
                   "jname takes masks (* and ?) on every command that acts on VMs. "
                   "cbsd COMMAND --help prints what this page says of COMMAND."),
             ".SH COMMANDS"]
    for cmd in COMMANDS.values():
        lines += _command(cmd)
    lines += [".SH EXIT STATUS",
              "0 success; 1 the operation failed; 2 bad arguments or input; 75 the VM is "
              "busy with another cbsd command.",
              ".SH ENVIRONMENT", ".TP", ".B CBSD_WORKDIR",
              _roff("where VMs live (default /var/lib/cbsd for root)"), ".TP",
              ".B CBSD_DEBUG", _roff("=1: QMP traffic, subprocesses, recovery decisions and "
                                     "tracebacks on stderr"),
              ".SH FILES", _roff("$CBSD_WORKDIR/var/db/local.sqlite (inventory), "
                                 "jails-system/VM/ (console.log, checkpoints, vm.json), "
                                 "vm/VM/ (disks)")]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
