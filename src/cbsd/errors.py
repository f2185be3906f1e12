"""Every error cbsd reports, with its message and exit code.

Errors become exit codes in one function, ``describe()``, which ``cli/main.py`` (the whole
command) and ``cli/commands.each`` (one VM of several) both call; nothing else exits.

    CbsdError (1)                   the operation failed
    ├── UsageError (2)              bad arguments or bad input: nothing was done
    │   ├── NoSuchVM (2)            a name or mask that matches no VM
    │   └── ArchiveError (2)        an export archive is damaged, truncated or altered
    ├── StateError (1)              the VM is in the wrong state for the command
    ├── BusyError (75)              another cbsd command holds the VM's lock
    ├── QemuError (1)               QEMU refused, failed or died
    │   ├── QmpCommandError (1)     QEMU answered a QMP command with an error (its class kept)
    │   └── MigrationFailed (1)     a save or load of the VM's state failed inside QEMU
    ├── CheckpointError (1)         a checkpoint is missing, damaged or incompatible
    ├── NoSpaceError (1)            the disk is full (or would be)
    ├── EnvironmentFault (1)        the workdir or the inventory cannot be used as they are
    ├── Cancelled (1)               interrupted by SIGINT/SIGTERM, rolled back
    └── NodeError (1 or the node's) a node could not be reached, or cbsd there failed

Anything else that reaches ``describe()`` (an OSError, a sqlite3 error, a bug) still becomes
one line and exit 1; the traceback is printed only with CBSD_DEBUG=1.
"""

from __future__ import annotations

import os
import sys

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_BUSY = 75


class CbsdError(Exception):
    exit_code = EXIT_FAILED

    def __init__(self, message: str) -> None:
        # One line, always: the contract promises a one-line message on stderr.
        super().__init__(" ".join(str(message).split()))

    @property
    def message(self) -> str:
        return str(self)


class UsageError(CbsdError):
    exit_code = EXIT_USAGE


class NoSuchVM(UsageError):
    pass


class ArchiveError(UsageError):
    """An export archive is damaged, truncated, altered, or not one (bad input)."""


class StateError(CbsdError):
    pass


class BusyError(CbsdError):
    exit_code = EXIT_BUSY


class QemuError(CbsdError):
    pass


class QmpCommandError(QemuError):
    """QEMU's answer {"error": {"class": ..., "desc": ...}} to *command*: callers branch on
    these attributes, never on the message text."""

    def __init__(self, jname: str, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"{jname}: QEMU refused {command}: {desc}")
        self.command = command
        self.error_class = error_class
        self.desc = desc


class MigrationFailed(QemuError):
    """query-migrate reported 'failed' (or 'cancelled'); *desc* is QEMU's error-desc."""

    def __init__(self, jname: str, status: str, desc: str) -> None:
        super().__init__(f"{jname}: saving/loading the state failed: {desc or status}")
        self.status = status
        self.desc = desc

    @property
    def no_space(self) -> bool:
        # lazy: only an error's message; --version and the pause lane import this module
        import errno

        return os.strerror(errno.ENOSPC) in self.desc or os.strerror(errno.EDQUOT) in self.desc


class CheckpointError(CbsdError):
    pass


class NoSpaceError(CbsdError):
    pass


class EnvironmentFault(CbsdError):
    pass


class Cancelled(CbsdError):
    pass


class NodeError(CbsdError):
    """A node could not be reached, or cbsd there failed (its exit code kept)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def describe(e: BaseException) -> tuple[str, int]:
    """Any exception -> (one line for stderr, exit code). The traceback goes to stderr only
    with CBSD_DEBUG set; without it no path can print one."""
    if os.environ.get("CBSD_DEBUG"):
        # lazy: only with CBSD_DEBUG; traceback pulls in linecache/tokenize
        import traceback

        traceback.print_exception(e)
    if isinstance(e, CbsdError):
        return e.message, e.exit_code
    if isinstance(e, KeyboardInterrupt):
        return "cancelled", EXIT_FAILED
    if isinstance(e, OSError):
        return os_error_line(e), EXIT_FAILED

    if "sqlite3" in sys.modules and isinstance(e, sys.modules["sqlite3"].Error):
        return " ".join(f"cbsd: inventory error: {e} (the inventory may be damaged: see "
                        "docs/reliability.md, 'Rebuilding the inventory')".split()), EXIT_FAILED
    text = " ".join(str(e).split())
    return (f"cbsd: internal error: {type(e).__name__}{': ' + text if text else ''} "
            "(run with CBSD_DEBUG=1 for the traceback, and please report it)"), EXIT_FAILED


def os_error_line(e: OSError) -> str:
    """'cbsd: cannot use /x/y: Read-only file system' from any OSError."""
    # lazy: only an error's message; --version and the pause lane import this module
    import errno

    what = e.strerror or str(e)
    where = f" {e.filename}" if e.filename else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"cbsd: no space left on device{' for' + where if where else ''}"
    return " ".join(f"cbsd: cannot use{where or ' a file'}: {what}".split())
