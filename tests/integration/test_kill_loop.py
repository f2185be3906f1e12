"""A bounded, seeded random kill -9 loop over every state-changing command on one VM. After
each kill: bls is truthful (On/Paused exactly when one QEMU of the VM runs, with its pid), every
checkpoint verifies, the next locked command leaves no partial files and no orphaned disk
snapshot, and the guest -- restored, resumed or unpaused as needed -- continues with its disk
matching its memory."""

from __future__ import annotations

import os
import random
import time

import pytest

from tests.harness import Cbsd, qemu_processes
from tests.vmchecks import assert_guest_fine, disk_tags, hidden_leftovers

pytestmark = pytest.mark.vm

SEED = int(os.environ.get("CBSD_KILL_SEED", "20261201"))
ROUNDS = 36
BUDGET = 180.0  # seconds: the loop stops early rather than run longer

OPS = [
    ("bcheckpoint", "mode=create", "jname=vm1", "name=k"),
    ("bcheckpoint", "mode=create", "jname=vm1", "name=k", "live=1"),
    ("bcheckpoint", "mode=destroy", "jname=vm1", "name=k"),
    ("bsuspend", "jname=vm1"),
    ("bstart", "jname=vm1"),
    ("bstart", "jname=vm1", "checkpoint=base"),
    ("bstop", "jname=vm1", "noacpi=1"),
    ("bpause", "jname=vm1"),
]


def check_truthful(cbsd: Cbsd) -> str:
    row = cbsd.bls("vm1")[0]
    qemus = qemu_processes(cbsd.workdir)
    if row["status"] in ("On", "Paused"):
        assert qemus == [row["jid"]], (row, qemus)
    else:
        assert row["status"] in ("Off", "Suspended") and qemus == [], (row, qemus)
    return str(row["status"])


def bring_up(cbsd: Cbsd) -> None:
    """Back to running by the ordinary commands a user would use, whatever the kill left."""
    for _ in range(4):
        status = cbsd.status("vm1")
        if status == "On":
            return
        if status == "Paused":
            cbsd("bpause", "vm1", "mode=off")  # a QEMU that never loaded goes Off instead
        elif status == "Suspended":
            cbsd("bstart", "vm1").ok()
        else:
            cbsd("bstart", "vm1", "checkpoint=base").ok()
    assert cbsd.status("vm1") == "On"


def test_random_kill9_loop(cbsd: Cbsd, counter_image) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(SEED)
    cbsd("bcreate", "jname=vm1", f"image={counter_image(fill_mib=4)}", "vm_os_type=other",
         "vm_ram=32m").ok()
    cbsd("bstart", "vm1").ok()
    assert_guest_fine(cbsd, "vm1")
    cbsd("bcheckpoint", "mode=create", "jname=vm1", "name=base").ok()
    deadline = time.monotonic() + BUDGET
    done = 0
    for _ in range(ROUNDS):
        if time.monotonic() > deadline:
            break
        op = rng.choice(OPS)
        p = cbsd.popen(*op)
        time.sleep(rng.uniform(0.02, 0.5))
        p.kill()
        p.communicate(timeout=30)
        check_truthful(cbsd)
        cbsd("bcheckpoint", "mode=verify", "jname=vm1").ok()
        # A locked command (recovery runs first), then nothing partial may be left.
        cbsd("bcheckpoint", "mode=destroy", "jname=vm1", "name=zz").fails(
            1, "vm1: no checkpoint zz")
        assert hidden_leftovers(cbsd, "vm1") == [], op
        names = {c["name"] for c in cbsd.checkpoints("vm1")}
        image = (cbsd.system("vm1") / "hibernate.ckp").exists()
        assert "base" in names
        assert len(disk_tags(cbsd, "vm1")) == len(names) + image, (op, names, image)
        check_truthful(cbsd)
        bring_up(cbsd)
        check_truthful(cbsd)
        assert_guest_fine(cbsd, "vm1")
        done += 1
    assert done >= 12, f"only {done} rounds in {BUDGET} s"
