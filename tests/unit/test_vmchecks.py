"""The integration tests' own readings are right: the first count after a restore is read from
the restored guest's lines, never from the old QEMU's (tests/vmchecks.py)."""

from __future__ import annotations

from pathlib import Path

from tests.harness import Cbsd
from tests.vmchecks import first_after


def test_first_after_a_restore_sees_only_the_restored_guest(tmp_path: Path) -> None:
    cbsd = Cbsd(tmp_path)
    log = cbsd.console("vm1").path
    log.parent.mkdir(parents=True)
    log.write_bytes(("FILLED\r\nBOOT disk=0\r\n" + "".join(
        f"n={i} disk={i - 1} OK\r\n" for i in range(1, 20))).encode())
    mark = cbsd.console("vm1").mark()  # taken as restored_from takes it
    with open(log, "ab") as f:
        f.write(b"n=13 disk=12 OK\r\nn=14 disk=13 OK\r\n")
    assert first_after(cbsd, "vm1", mark) == 13
    text_mode_mark = len(log.read_text().rsplit("n=13", 1)[0])  # the old mark_of's count
    assert first_after(cbsd, "vm1", text_mode_mark) != 13  # what it read: the old guest
