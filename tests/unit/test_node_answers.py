"""What a node answers is checked for its shape before cbsd uses it (cbsd/node_answers.py):
bls rows, staging ids, commit/abort/status answers and bmigrate's sockets; and the owner
written on cbsd0 (qemu/network.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cbsd import node_answers as na
from cbsd.qemu import network

ROW: dict[str, Any] = {"jname": "vm1", "jid": 123, "vm_ram": 32, "vm_curmem": 10,
                       "vm_cpus": 1, "pcpu": 0.5, "vm_os_type": "linux", "ip4_addr": "DHCP",
                       "status": "On", "vnc_port": "127.0.0.1:5900"}


def test_a_listing_of_the_expected_shape_passes_and_unknown_keys_are_dropped() -> None:
    rows = na.bls_rows([ROW, {**ROW, "jname": "vm2", "pcpu": 0, "newer_column": "x"}])
    assert rows[0] == ROW
    assert "newer_column" not in rows[1] and rows[1]["jname"] == "vm2"
    assert na.bls_rows([]) == []


BAD_LISTINGS: dict[str, tuple[Any, str]] = {
    "an object": ({"vms": [ROW]}, "not a list"),
    "a list of numbers": ([1, 2], "not an object"),
    "a missing column": ([{k: v for k, v in ROW.items() if k != "status"}], "lacks status"),
    "a bad name": ([{**ROW, "jname": "../etc"}], "not a VM name"),
    "a name that is not text": ([{**ROW, "jname": 7}], "not a VM name"),
    "a negative pid": ([{**ROW, "jid": -1}], "jid"),
    "a boolean as a number": ([{**ROW, "vm_ram": True}], "vm_ram"),
    "a text as a number": ([{**ROW, "vm_cpus": "2"}], "vm_cpus"),
    "an infinite pcpu": ([{**ROW, "pcpu": float("inf")}], "pcpu"),
    "an unknown status": ([{**ROW, "status": "Exploded"}], "status"),
    "a status that is a list": ([{**ROW, "status": ["On"]}], "status"),
    "a pcpu beyond any float": ([{**ROW, "pcpu": 10 ** 400}], "pcpu"),
    "a NaN pcpu": ([{**ROW, "pcpu": float("nan")}], "pcpu"),
    "a terminal escape": ([{**ROW, "vm_os_type": "\x1b]0;pwned\x07"}], "control characters"),
    "an overlong text": ([{**ROW, "ip4_addr": "1" * 65}], "longer than 64"),
}


@pytest.mark.parametrize("kind", sorted(BAD_LISTINGS))
def test_a_listing_of_another_shape_is_refused_saying_what(kind: str) -> None:
    data, why = BAD_LISTINGS[kind]
    with pytest.raises(na.BadAnswer, match=why):
        na.bls_rows(data)


def test_a_refusal_never_echoes_control_characters() -> None:
    with pytest.raises(na.BadAnswer) as e:
        na.bls_rows([{**ROW, "status": "\x1b[2J" + "x" * 100}])
    assert "\x1b" not in str(e.value) and len(str(e.value)) < 200


def test_what_a_node_says_on_stderr_is_shown_without_control_characters() -> None:
    from cbsd import ssh

    line = ssh.last_line(b"progress\n\x1b]2;owned\x07 failed: " + b"x" * 1000 + b"\n")
    assert "\x1b" not in line and "\x07" not in line and len(line) <= 300
    assert line.startswith("?]2;owned? failed")
    assert ssh.last_line(b"") == "failed without a message"


def test_bimport_answers() -> None:
    assert na.staging_id("progress\n0123456789abcdef\n") == "0123456789abcdef"
    for bad in ("", "0123456789ABCDEF", "../../x", "0123456789abcdef0"):
        with pytest.raises(na.BadAnswer):
            na.staging_id(bad)
    assert na.committed("vm1: imported\n") == "vm1"
    for bad in ("vm1: failed", "../x: imported", ""):
        with pytest.raises(na.BadAnswer):
            na.committed(bad)
    assert na.aborted("aborted\n") is None
    assert na.aborted("committed vm1\n") == "vm1"
    for bad in ("", "done", "committed ../x", "committed"):
        with pytest.raises(na.BadAnswer):
            na.aborted(bad)


def test_bmigrate_answers() -> None:
    assert na.migrate_status("registered\n") == "registered"
    assert na.migrate_status("absent") == "absent"
    with pytest.raises(na.BadAnswer):
        na.migrate_status("maybe")
    good = {"nbd": "/w/jails-system/vm1/nbd.sock", "migration": "/w/jails-system/vm1/mig.sock"}
    assert na.migrate_sockets(good) == good
    for bad in ([], {"nbd": good["nbd"]}, {**good, "nbd": "relative.sock"},
                {**good, "nbd": "/a:b"}, {**good, "migration": 5},
                {**good, "nbd": "/x\n-oProxyCommand=y"}):
        with pytest.raises(na.BadAnswer):
            na.migrate_sockets(bad)
    assert na.migrate_done({"running": False}) is False
    for bad in ({}, {"running": "yes"}, [True]):
        with pytest.raises(na.BadAnswer):
            na.migrate_done(bad)


def test_cbsd0_owner_round_trips_through_the_alias() -> None:
    tag = network.owner_tag(Path("/var/lib/cbsd"))
    assert network.owner_of(tag) == "/var/lib/cbsd"
    assert network.owner_of("") is None and network.owner_of("uplink to lab") is None
    assert len(network.owner_tag(Path("/" + "x" * 400))) == 255


def test_the_request_bmigrate_sends_a_node_is_checked_as_any_definition_from_outside() -> None:
    import json

    from cbsd.core.hosts.migrate_in import _request
    from cbsd.errors import UsageError
    from cbsd.model import VMSpec

    spec = VMSpec(jname="vm1", ram=64 << 20, disks=["dsk1.qcow2"])
    good = {"spec": spec.to_dict(), "sizes": {"dsk1.qcow2": 1 << 30}, "paused": True,
            "source": {"qemu": "7.2.0", "accel": "tcg", "cpu": {"model": "qemu64"}}}
    got, source, sizes, paused, _, ckp = _request(json.dumps(good).encode(), "vm1")
    assert ckp is None  # no checkpoints follow
    assert _request(json.dumps({**good, "checkpoints": "c2"}).encode(), "vm1")[5] == "c2"
    assert got == spec and sizes == {"dsk1.qcow2": 1 << 30} and paused is True
    assert source["accel"] == "tcg"
    bad = {
        "not JSON": b"{",
        "no definition": json.dumps({**good, "spec": "x"}).encode(),
        "another VM's disk": json.dumps({**good, "spec": {**spec.to_dict(),
                                                          "disks": ["../vm2/dsk1.qcow2"]},
                                         }).encode(),
        "a size as text": json.dumps({**good, "sizes": {"dsk1.qcow2": "1g"}}).encode(),
        "no size": json.dumps({**good, "sizes": {}}).encode(),
        "no source": json.dumps({**good, "source": None}).encode(),
        "a path as the current checkpoint": json.dumps({**good, "checkpoints": "../x"}).encode(),
    }
    for line in bad.values():
        with pytest.raises(UsageError):
            _request(line, "vm1")


def test_an_answer_nested_beyond_reason_is_a_node_error_not_a_crash() -> None:
    """json.loads raises RecursionError, not ValueError, on deep nesting; a validator that
    meets a type it did not foresee still refuses: either way one NodeError."""
    from cbsd import ssh

    node = ssh.Node("b", "root@10.0.0.2", 22)
    with pytest.raises(ssh.NodeError, match=r"node b: .*not what cbsd expects"):
        node.checked("bls", lambda a: sorted(a), [1, "x"])  # TypeError inside a check

    class Deep(ssh.Node):
        def call(self, args: list[str], **kw: Any) -> str:
            return "[" * 100_000 + "]" * 100_000

    with pytest.raises(ssh.NodeError, match="not JSON"):
        Deep("b", "root@10.0.0.2", 22).call_json(["bls"])
