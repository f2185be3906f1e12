"""bexec and bscp through the guest agent (issue 23 part 4), through the CLI: against the
Debian guest, which runs qemu-guest-agent and whose network leads nowhere (no SSH is used
here), and against the boot-sector counter guest, which has no agent."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from tests.guests.debian_ssh import Debian
from tests.harness import Cbsd

pytestmark = [pytest.mark.vm]


def ready(deb: Debian) -> Debian:
    """Started from the `ready` checkpoint, with its agent answering (the helper cbsd starts
    after a restore records that): a deadline, not a fixed wait."""
    deb.start_from()
    deadline = time.monotonic() + 150
    while not deb.agent_state().get("agent"):
        assert time.monotonic() < deadline, "the guest agent never answered"
        time.sleep(0.5)
    return deb


@pytest.mark.debian
def test_bexec_passes_output_stderr_and_exit_code_through(deb: Debian) -> None:
    ready(deb)
    r = deb.cbsd("bexec", "jname=deb", "cmd=echo hello; echo $((6 * 7))").ok()
    assert (r.out, r.err) == ("hello\n42\n", "")
    # The command line is the guest shell's, as CBSD's bexec (words after the name too).
    assert deb.cbsd("bexec", "deb", "cat", "/etc/hostname", "|", "wc", "-c").ok().out.strip() \
        == str(len(deb.ssh("cat /etc/hostname").stdout))
    r = deb.cbsd("bexec", "deb", "cmd=echo to-out; echo oops >&2; exit 7")
    assert (r.code, r.out, r.err) == (7, "to-out\n", "oops\n")
    r = deb.cbsd("bexec", "deb", "cmd=kill -TERM $$")
    assert (r.code, r.out, r.err) == (128 + 15, "", "")
    # Large output: 1.3 MB, every byte of it, in order.
    r = deb.cbsd("bexec", "deb", "cmd=seq 1 200000").ok()
    assert r.out == "".join(f"{i}\n" for i in range(1, 200001))
    # A command that outlives timeout=: cbsd's own failure, one 'cbsd:' line.
    deb.cbsd("bexec", "deb", "cmd=sleep 60", "timeout=1").fails(1, "cbsd: deb: the command")
    # A paused guest cannot answer: refused at once, not left waiting.
    deb.cbsd("bpause", "deb", "mode=on").ok()
    deb.cbsd("bexec", "deb", "cmd=true").fails(1, "cbsd: deb: is paused")
    deb.cbsd("bpause", "deb", "mode=off").ok()
    assert deb.cbsd("bexec", "deb", "cmd=echo back").ok().out == "back\n"


@pytest.mark.debian
def test_bscp_in_and_out_exactly(deb: Debian, tmp_path: Path) -> None:
    ready(deb)
    src = tmp_path / "in.bin"
    data = os.urandom(3 * 1024 * 1024 + 12345)  # several agent chunks and a ragged tail
    src.write_bytes(data)
    want = hashlib.sha256(data).hexdigest()
    deb.cbsd("bscp", str(src), "deb:/tmp/in.bin").ok()
    assert deb.cbsd("bexec", "deb", "cmd=sha256sum /tmp/in.bin").ok().out.split()[0] == want
    # scp overwrites: a second, shorter copy replaces the first entirely.
    short = tmp_path / "short"
    short.write_bytes(b"short\n")
    deb.cbsd("bscp", str(short), "deb:/tmp/in.bin").ok()
    assert deb.cbsd("bexec", "deb", "cmd=cat /tmp/in.bin").ok().out == "short\n"
    # Out of the guest: a file, and into a directory under the guest file's name.
    deb.cbsd("bexec", "deb", "cmd=head -c 2500000 /dev/urandom > /tmp/out.bin").ok()
    guest_sum = deb.cbsd("bexec", "deb", "cmd=sha256sum /tmp/out.bin").ok().out.split()[0]
    deb.cbsd("bscp", "deb:/tmp/out.bin", str(tmp_path / "out.bin")).ok()
    assert hashlib.sha256((tmp_path / "out.bin").read_bytes()).hexdigest() == guest_sum
    (tmp_path / "dir").mkdir()
    deb.cbsd("bscp", "deb:/tmp/out.bin", str(tmp_path / "dir")).ok()
    assert (tmp_path / "dir" / "out.bin").read_bytes() == (tmp_path / "out.bin").read_bytes()
    # A guest file that is not there: one line, exit 1, nothing left on the host.
    deb.cbsd("bscp", "deb:/tmp/none", str(tmp_path / "none")).fails(1, "/tmp/none")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "in.bin", "out.bin", "short"]


@pytest.mark.debian
def test_stopped_vm_and_bad_input(deb: Debian, tmp_path: Path) -> None:
    if deb.cbsd.status("deb") != "Off":
        deb.cbsd("bstop", "deb", "noacpi=1").ok()
    deb.cbsd("bexec", "deb", "cmd=true").fails(1, "not running")
    (tmp_path / "f").write_bytes(b"x")
    deb.cbsd("bscp", str(tmp_path / "f"), "deb:/tmp/f").fails(1, "not running")
    deb.cbsd("bexec", "deb").fails(2, "no command")
    deb.cbsd("bexec", "nosuch", "cmd=true").fails(2, "nosuch")
    deb.cbsd("bscp", str(tmp_path / "f")).fails(2, "a source and a destination")
    deb.cbsd("bscp", str(tmp_path / "f"), "/tmp/g").fails(2, "VM:/PATH")
    deb.cbsd("bscp", str(tmp_path / "f"), "deb:relative").fails(2, "absolute")
    deb.cbsd("bscp", str(tmp_path / "missing"), "deb:/tmp/f").fails(1, "missing")


def test_a_guest_without_an_agent_gets_one_line(cbsd: Cbsd, running_counter: str,
                                                 tmp_path: Path) -> None:
    cbsd("bexec", running_counter, "cmd=true").fails(1, "install qemu-guest-agent")
    (tmp_path / "f").write_bytes(b"x")
    cbsd("bscp", str(tmp_path / "f"), f"{running_counter}:/f").fails(
        1, "install qemu-guest-agent")
