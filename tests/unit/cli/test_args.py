"""Argument parsing, table-driven: every bad input is a UsageError whose message names it."""

from __future__ import annotations

import pytest

from cbsd.cli.args import help_text, parse
from cbsd.cli.table import COMMANDS
from cbsd.errors import UsageError

BAD = [
    # (command, argv, message fragment)
    ("bstart", ["jname=vm1", "foo=1"], "unknown key 'foo'"),
    ("bstart", ["jname=vm1", "Paused=1"], "unknown key 'Paused'"),
    ("bstart", [], "missing required key 'jname'"),
    ("bstart", ["jname=vm1", "paused=2"], "bad value for paused: '2'"),
    ("bstart", ["jname=../x"], "bad jname '../x'"),
    ("bstart", ["jname=vm1", "checkpoint=../../etc"], "bad checkpoint '../../etc'"),
    ("bstart", ["--force", "vm1"], "unknown option '--force'"),
    ("bstart", ["jname=vm1", "paused=1", "paused=0"], "key 'paused' given twice"),
    ("bcreate", [], "missing required key 'jname'"),
    ("bcreate", ["jname=a b"], "bad jname 'a b'"),
    ("bcreate", ["jname=.hidden"], "bad jname '.hidden'"),
    ("bcreate", ["jname=-x"], "bad jname '-x'"),
    ("bcreate", ["jname=" + "a" * 65], "bad jname"),
    ("bcreate", ["jname=vm*"], "bad jname 'vm*'"),
    ("bcreate", ["jname=vm1", "vm_ram=lots"], "bad value for vm_ram: 'lots' is not a size"),
    ("bcreate", ["jname=vm1", "vm_ram=0"], "must be greater than zero"),
    ("bcreate", ["jname=vm1", "imgsize=10x"], "bad value for imgsize"),
    ("bcreate", ["jname=vm1", "vm_cpus=0"], "bad value for vm_cpus: '0'"),
    ("bcreate", ["jname=vm1", "vm_os_type=beos"], "one of: linux, freebsd, windows, other"),
    ("bcreate", ["jname=vm1", "nic=tap"], "bad value for nic"),
    ("bcreate", ["jname=vm1", "hostfwd=tcp:99999:22"], "bad value for hostfwd"),
    ("bcreate", ["jname=vm1", "hostfwd=ssh"], "bad value for hostfwd"),
    ("bcreate", ["jname=vm1", "hostfwd=tcp:300.0.0.1:22:22"], "bad value for hostfwd"),
    ("bcreate", ["jname=vm1", "hostfwd=tcp:localhost:22:22"], "bad value for hostfwd"),
    ("bcreate", ["jname=vm1", "hostfwd=tcp:2222:22,tcp:0.0.0.0:2222:80"], "forwarded twice"),
    ("bcreate", ["vm1", "vm2"], "takes one VM name, got 2"),
    ("bcheckpoint", ["jname=vm1"], "missing required key 'mode'"),
    ("bcheckpoint", ["jname=vm1", "mode=snapshot"], "bad value for mode: 'snapshot'"),
    ("bcheckpoint", ["jname=vm1", "mode=create", "name=a/b"], "bad name 'a/b'"),
    ("bcheckpoint", ["jname=vm1", "mode=create", "name=.."], "bad name '..'"),
    ("bcheckpoint", ["jname=vm1", "mode=create", "suspend=1", "poweroff=1"], "given twice"),
    ("bls", ["display=jname,bogus"], "bad value for display: 'bogus'"),
    ("bls", ["format=xml"], "bad value for format"),
    ("bstop", ["jname=vm1", "hard_timeout=-1"], "bad value for hard_timeout"),
    ("bpause", ["jname=vm1", "mode=toggle"], "bad value for mode"),
    ("bsuspend", ["jname=vm1", "parallel=0"], "bad value for parallel"),
]


@pytest.mark.parametrize(("command", "argv", "fragment"), BAD,
                         ids=[f"{c}-{' '.join(a)[:30]}" for c, a, _ in BAD])
def test_bad_arguments_are_usage_errors(command: str, argv: list[str], fragment: str) -> None:
    with pytest.raises(UsageError) as e:
        parse(COMMANDS[command], argv)
    assert fragment in e.value.message
    assert "\n" not in e.value.message
    assert e.value.exit_code == 2


def test_defaults_are_filled_in() -> None:
    a = parse(COMMANDS["bcreate"], ["jname=vm1"])
    assert a["jname"] == "vm1"
    assert a["vm_ram"] == 512 << 20
    assert a["vm_cpus"] == 1
    assert a["nic"] == "user"
    assert a["vnc"] is False


def test_key_value_in_any_order_and_bare_names() -> None:
    a = parse(COMMANDS["bstart"], ["paused=1", "vm1", "jname=web*", "vm2"])
    assert a["names"] == ["vm1", "web*", "vm2"]
    assert a["paused"] is True


def test_sizes_and_hostfwd_are_converted() -> None:
    a = parse(COMMANDS["bcreate"], ["jname=vm1", "vm_ram=1g", "imgsize=512M",
                                    "hostfwd=tcp:2222:22,udp:5353:53,8080:80"])
    assert a["vm_ram"] == 1 << 30
    assert a["imgsize"] == 512 << 20
    assert a["hostfwd"] == ["tcp:127.0.0.1:2222:22", "udp:127.0.0.1:5353:53",
                            "tcp:127.0.0.1:8080:80"]
    a = parse(COMMANDS["bcreate"], ["jname=vm1", "hostfwd=tcp:0.0.0.0:2222:22,10.1.2.3:80:80"])
    assert a["hostfwd"] == ["tcp:0.0.0.0:2222:22", "tcp:10.1.2.3:80:80"]


def test_suspend_is_an_alias_of_poweroff() -> None:
    a = parse(COMMANDS["bcheckpoint"], ["jname=vm1", "mode=create", "suspend=1"])
    assert a["poweroff"] is True


def test_bls_takes_no_required_name() -> None:
    a = parse(COMMANDS["bls"], ["display=JNAME,status", "header=0"])
    assert a["display"] == ["jname", "status"]
    assert a["header"] is False
    assert a["names"] == []


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_help_with_keys_and_example(name: str) -> None:
    text = help_text(COMMANDS[name])
    assert text.startswith(f"usage: cbsd {name}")
    assert "example:" in text
    for key in COMMANDS[name].keys:
        assert key.name in text
