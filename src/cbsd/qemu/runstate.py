"""QEMU's run states (QAPI's RunState, as query-status reports them) and the migration
statuses cbsd acts on: one spelling for every module. bpause's quick lane compares the two it
needs as plain strings (importing enum would cost it more than its work);
tests/unit/cli/test_pause_lane.py holds those literals equal to these."""

from __future__ import annotations

import enum


class RunState(enum.StrEnum):
    DEBUG = "debug"
    INMIGRATE = "inmigrate"  # waiting for or reading an incoming state (-incoming)
    INTERNAL_ERROR = "internal-error"
    IO_ERROR = "io-error"
    PAUSED = "paused"
    POSTMIGRATE = "postmigrate"  # an outgoing migration completed: vCPUs stopped, disks inactive
    PRELAUNCH = "prelaunch"  # started with -S, never run
    FINISH_MIGRATE = "finish-migrate"  # the last moment of an outgoing migration
    RESTORE_VM = "restore-vm"
    RUNNING = "running"
    SAVE_VM = "save-vm"
    SHUTDOWN = "shutdown"
    SUSPENDED = "suspended"
    WATCHDOG = "watchdog"
    GUEST_PANICKED = "guest-panicked"
    COLO = "colo"

    @classmethod
    def parse(cls, value: str) -> RunState | None:
        try:
            return cls(value)
        except ValueError:
            return None  # a state a newer QEMU added: treated as "nothing to recover"


class MigrationStatus(enum.StrEnum):
    NONE = "none"
    SETUP = "setup"
    ACTIVE = "active"
    DEVICE = "device"
    PRE_SWITCHOVER = "pre-switchover"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


IN_PROGRESS = frozenset({MigrationStatus.SETUP, MigrationStatus.ACTIVE, MigrationStatus.DEVICE,
                         MigrationStatus.PRE_SWITCHOVER})
ENDED = frozenset({MigrationStatus.COMPLETED, MigrationStatus.FAILED, MigrationStatus.CANCELLED})
