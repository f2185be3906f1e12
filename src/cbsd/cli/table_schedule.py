"""Scheduled checkpoints' keys (bcreate, bset) and `cbsd bschedule`, declared as every other
key and command is (cli/table.py puts the keys into bcreate's and bset's and the command into
COMMANDS: parsing, --help and the man page). docs/checkpoints.md "Schedules"."""

from __future__ import annotations

from cbsd.cli.args import Command, Key
from cbsd.model import DEFAULT_CHECKPOINT_PATTERN

# bset may change them while the VM runs. Checked beyond their kind by cbsd/specs.py and
# core/manage/cron.py.
SCHEDULE = (
    Key("checkpoint_schedule", "str", "", help="take checkpoints on this schedule: cron's 5 "
        "fields or @hourly, @daily, @weekly, @monthly, @yearly (host's local time; empty: "
        "none); run by 'cbsd serve' or 'cbsd bschedule'"),
    Key("checkpoint_expiry", "str", "", help="destroy each scheduled checkpoint this long "
        "after it was taken: 30m, 12h, 2d, 1w, 1d12h (empty: keep it)"),
    Key("checkpoint_pattern", "str", DEFAULT_CHECKPOINT_PATTERN, help="scheduled "
        "checkpoints' names, with strftime time fields %Y %m %d %H %M %S ..."),
    Key("checkpoint_live", "bool", False, help="scheduled checkpoints of a running VM with "
        "live=1 (the guest keeps running while its memory is written)"),
    Key("checkpoint_stopped", "bool", False, help="a stopped VM gets scheduled checkpoints "
        "too (of its disks: restoring one boots from them)"),
)
SCHEDULE_COMMANDS = (
    Command(
        "bschedule", "Run the checkpoint schedules once now: take the due checkpoints, destroy "
        "the expired ones.",
        (Key("jname", "mask", None, help="only VMs matching this mask (default: every VM)"),),
        "cbsd bschedule",
        details=("'cbsd serve' runs this every minute; without the service, a cron job or "
                 "systemd timer can run\nit every minute. The keys are each VM's "
                 "checkpoint_schedule=, checkpoint_expiry=,\ncheckpoint_pattern=, "
                 "checkpoint_live=, checkpoint_stopped= (bcreate, bset). A schedule missed\n"
                 "while nothing ran it runs once; a busy VM is skipped and retried at the "
                 "next run\n(docs/checkpoints.md)."),
    ),
)
