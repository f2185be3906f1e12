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
# Replication to a standby (docs/cluster.md "Replication"): bset only, checked against the
# cluster by core/cluster/replica.check_settings (cli/commands.bset).
HA = (
    Key("ha", "bool", False, help="replicate the running VM to its standby node every "
        "ha_interval (a cluster node only)"),
    Key("ha_node", "name", None, help="ha=1: the standby, another node of the cluster"),
    Key("ha_interval", "str", "30s", help="ha=1: how often: 30s, 5m, 1m30s (at least 5s)"),
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
BREPLICA = Command(
    "breplica", "The standby's half of replication (bcheckpoint mode=replicate runs it there).",
    (
        Key("jname", "name", None, required=True, help="the replicated VM"),
        Key("mode", "enum", None, required=True, help="status, apply: what the owner runs "
            "here over ssh; promote: register the published replica as a VM of this node "
            "(its ownership taken first), then restore the checkpoint it names; remove: "
            "drop the replica here", choices=("status", "apply", "promote", "remove")),
    ),
    "cbsd breplica jname=vm1 mode=promote",
    bare="one",
    details=("A replica is not in this node's inventory until promoted (docs/cluster.md "
             "\"Replication\")."),
)
