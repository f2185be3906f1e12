"""Every error cbsd reports, with its message and exit code.

The CLI's ``main()`` is the only place that turns these into exit codes; nothing else exits.

    CbsdError (1)                   the operation failed
    ├── UsageError (2)              bad arguments or bad input: nothing was done
    │   └── NoSuchVM (2)            a name or mask that matches no VM
    ├── StateError (1)              the VM is in the wrong state for the command
    ├── BusyError (75)              another cbsd command holds the VM's lock
    ├── QemuError (1)               QEMU refused, failed or died
    ├── CheckpointError (1)         a checkpoint is missing, damaged or incompatible
    ├── NoSpaceError (1)            the disk is full (or would be)
    └── Cancelled (1)               interrupted by SIGINT/SIGTERM, rolled back
"""

from __future__ import annotations

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


class StateError(CbsdError):
    pass


class BusyError(CbsdError):
    exit_code = EXIT_BUSY


class QemuError(CbsdError):
    pass


class CheckpointError(CbsdError):
    pass


class NoSpaceError(CbsdError):
    pass


class Cancelled(CbsdError):
    pass
