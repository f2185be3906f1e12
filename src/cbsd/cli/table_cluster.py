"""The cluster's keys and commands (issue 25, docs/cluster.md): bset's ha keys, `cbsd
bcluster` and `cbsd breplica`, declared as every other key and command is (cli/table.py puts
the keys into bset's and the commands into COMMANDS: parsing, --help and the man page)."""

from __future__ import annotations

from cbsd.cli.args import Command, Key

# Replication to a standby (docs/cluster.md "Replication"): bset only, checked against the
# cluster by core/cluster/replica.check_settings (cli/commands.bset).
HA = (
    Key("ha", "bool", False, help="replicate the running VM to its standby node every "
        "ha_interval (a cluster node only)"),
    Key("ha_node", "name", None, help="ha=1: the standby, another node of the cluster"),
    Key("ha_interval", "str", "30s", help="ha=1: how often: 30s, 5m, 1m30s (at least 5s)"),
)
BCLUSTER = Command(
    "bcluster", "Make this host a node of an etcd cluster, or show the cluster "
    "(docs/cluster.md).",
    (
        Key("mode", "enum", None, required=True, help="init: the first node (a CA, an "
            "etcd member here); issue: a joining node's bundle (on the init node); join; "
            "leave; start: the member and keeper again after a reboot; status",
            choices=("init", "issue", "join", "leave", "start", "status")),
        Key("name", "name", None, help="init, join: this node's name; issue: the joining "
            "node's"),
        Key("address", "str", None, help="init, join: this node's address (etcd listens "
            "there, TLS only); issue: the joining node's"),
        Key("bundle", "path", None, help="join: the folder mode=issue wrote"),
        Key("out", "path", None, help="issue: the folder to write the bundle to"),
        Key("member", "bool", True, help="join: run an etcd member here (0: a client of "
            "the members)"),
        Key("ttl", "int", 10, help="init: the node lease, seconds (a node is shown down "
            "this long after it stops renewing)", lo=2, hi=3600),
        Key("format", "enum", "text", help="status: output format",
            choices=("text", "json")),
        Key("watchdog", "str", None, help="init, join, start: the watchdog device (a "
            "character device) the keeper pets while healthy (/dev/watchdog: a hung keeper "
            "reboots the host); start: none turns it off"),
    ),
    "cbsd bcluster mode=init name=n1 address=10.0.0.1",
    bare="none",
    details=("Every member and node talks TLS with a client certificate of the cluster's "
             "CA. A VM's\nchanges are refused on any node but its owner (etcd's owner "
             "record). An HA VM is fenced\nwhen its node cannot renew its lease, and "
             "taken over by its standby (docs/cluster.md)."),
    readonly_modes=("status",),
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
CLUSTER_COMMANDS = (BCLUSTER, BREPLICA)
