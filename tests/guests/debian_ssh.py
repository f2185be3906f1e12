"""The Debian test guest driven from the host (tests/integration/test_debian.py, test_clock.py
and their fixtures in tests/integration/conftest.py): commands over SSH through the forwarded
port inside the test's network namespace, and readings of its workload (tests/guests/debian.py
builds the guest and its workload)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.guests.debian import DebianGuest
from tests.guests.netns import Netns
from tests.harness import Cbsd

SSH_PORT = 2222
USER = "cbsd"
HOSTNAME = "debtest"


# Freeze the workload, read its memory and its database, let it go on. A freeze that lands
# inside a transaction holds the database's lock: then thaw and try again.
FROZEN_READ = """for i in $(seq 60); do
  sudo pkill -STOP -x cbsd-workload
  out=$(cat /run/cbsd-workload.last && sudo sqlite3 /var/lib/cbsd-workload.db \\
        'SELECT max(id), count(*) FROM t; PRAGMA integrity_check;' 2>/dev/null)
  r=$?
  sudo pkill -CONT -x cbsd-workload
  if [ $r = 0 ]; then echo "$out"; exit 0; fi
  sleep 0.1
done
exit 1"""


@dataclass
class Debian:
    cbsd: Cbsd
    ns: Netns
    key: Path
    known_hosts: Path
    guest: DebianGuest
    ready_at: float = 0.0  # host time when the `ready` checkpoint was taken

    def ssh(self, command: str, timeout: float = 60, check: bool = True,
            ) -> subprocess.CompletedProcess[str]:
        p = self.ns.run("ssh", "-i", str(self.key), "-p", str(SSH_PORT), "-o", "BatchMode=yes",
                        "-o", "StrictHostKeyChecking=yes", "-o",
                        f"UserKnownHostsFile={self.known_hosts}", "-o", "ConnectTimeout=10",
                        "-o", "LogLevel=ERROR", f"{USER}@127.0.0.1", command, timeout=timeout)
        if check:
            assert p.returncode == 0, f"ssh {command!r}: exit {p.returncode}: {p.stderr}"
        return p

    def wait_ssh(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(subprocess.TimeoutExpired):
                if self.ssh("true", timeout=20, check=False).returncode == 0:
                    return
            assert time.monotonic() < deadline, "the guest never answered on SSH"
            time.sleep(2)

    def system_state(self, timeout: float = 300) -> str:
        """`systemctl is-system-running --wait` once booting is over. While the guest boots,
        cloud-init restarts sshd: a connection made then is reset (ssh exits 255, as when
        nothing listens behind QEMU's hostfwd), which says nothing of the guest's state, so
        ssh is asked again; any answer from the guest counts."""
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p = self.ssh("systemctl is-system-running --wait", timeout=timeout, check=False)
                if p.returncode != 255:
                    return p.stdout.strip()
            assert time.monotonic() < deadline, "the guest stopped answering on SSH"
            time.sleep(2)

    def boot_id(self) -> str:
        return self.ssh("cat /proc/sys/kernel/random/boot_id").stdout.strip()

    def workload(self) -> tuple[int, int, int, str]:
        """(last row in memory, max row on disk, rows on disk, integrity check), read while
        the workload process is frozen (SIGSTOP), so both describe one instant."""
        out = self.ssh(FROZEN_READ).stdout
        mem, _boot, disk = out.split(None, 2)
        top, count = disk.splitlines()[0].split("|")
        return int(mem), int(top), int(count), disk.splitlines()[1]

    def guest_is_sound(self, boot: str) -> int:
        """Same boot, the database intact and matching memory, the workload going on, no
        failed units. Returns the workload's row number."""
        assert self.boot_id() == boot, "the guest rebooted"
        mem, top, count, integrity = self.workload()
        assert integrity == "ok"
        assert count == top, "no row is missing from the database"
        assert top in (mem, mem + 1), f"disk ({top}) and memory ({mem}) disagree"
        self.wait_rows(past=mem, what="the workload continues")
        failed = self.ssh("systemctl --failed --no-legend --plain").stdout.strip()
        assert failed == "", failed
        return mem

    def wait_rows(self, past: int, what: str, timeout: float = 120) -> int:
        """Until the workload's row number (in memory) is above *past*; returns it."""
        deadline = time.monotonic() + timeout
        while (now := self.workload()[0]) <= past:
            assert time.monotonic() < deadline, f"{what}: still at row {now}, not past {past}"
            time.sleep(0.2)
        return now

    def clock_offset(self) -> float:
        """Guest clock minus host clock, in seconds (the SSH round trip counted as a bound)."""
        before = time.time()
        guest = float(self.ssh("date +%s.%N").stdout)
        after = time.time()
        return guest - after if guest > after else guest - before if guest < before else 0.0

    def agent_state(self) -> dict[str, object]:
        path = self.cbsd.system("deb") / "agent.json"
        data: dict[str, object] = json.loads(path.read_text()) if path.exists() else {}
        return data

    def start_from(self, checkpoint: str = "ready") -> str:
        if self.cbsd.status("deb") != "Off":
            self.cbsd("bstop", "deb", "noacpi=1").ok()
        self.cbsd("bstart", "deb", f"checkpoint={checkpoint}").ok()
        return self.boot_id()
