"""Replication to a standby (docs/cluster.md "Replication"): what one replication ships and
how long the guest stands still for it (python -m bench.run replicate ->
docs/benchmarks/replicate/).

Two cluster nodes (tests/guests/cluster.py: network namespaces, each with its own etcd
member, sshd and workdir). On a, the counter guest with 1 GiB of RAM (BENCH_REPLICATE_RAM=MiB
for a smaller one), 3/4 of it filled with random data at boot, rewriting CHURN pages of that
data (new random contents) per counter tick; b is its standby. The first replication ships
everything; each next one starts once the guest has rewritten SHARE of its RAM since the
previous one started (its ticks counted on its console, not a fixed time, so a slow TCG guest
is waited for; the ticks during the previous command count too: the guest runs on), then
`bcheckpoint mode=replicate` runs. Measured per replication: the bytes it shipped (memory chunks the
standby lacked, the disk delta or image) as a share of the guest's RAM, as the command
reports them; the guest's pause as cbsd records it (the vCPUs stopped: the checkpoint
manifest's guest gap) and the longest silence of the guest's console while the command ran
(an upper bound: it includes the guest's own time between two lines and the host's load)."""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

from tests.guests.build import counter_image

from bench.bench_engine import _ticks_for
from bench.common import Case, Study, report_header
from bench.guests import wait_counting
from bench.timing import GapWatch, settle

STUDY = Study("replicate")
RAM_MIB = int(os.environ.get("BENCH_REPLICATE_RAM", "1024"))
FILL = RAM_MIB * 3 // 4
CHURN = 16  # pages rewritten per counter tick: small, so the interval is counted in ticks
SHARE = 0.05  # of the guest's RAM rewritten between two replications
SHIPPED = re.compile(r"generation (\d+) replicated to b \((\d+) bytes of memory chunks, "
                     r"(\d+) of disks")
FULL, NEXT = "first (full)", f"each next ({SHARE:.0%} of RAM rewritten since the one before began)"


def run_all(repeat: int = 6) -> tuple[list[Case], dict[str, str]]:
    from tests.guests import cluster

    base = Path(tempfile.mkdtemp(prefix="cbsd-bench-replicate-", dir="/var/tmp"))
    shipped = Case("bytes shipped per replication (% of the guest's RAM)")
    pause = Case("the guest's pause per replication (ms)")
    silence = Case("the guest console's longest silence during a replication (ms)")
    whole = Case("one replication, whole command (s)")
    switch, made = cluster.make(base / "hosts")
    try:
        a, b = made[0], made[1]
        cluster.form([a, b], base)
        a.trust(b)
        a.cbsd("node", "mode=add", "name=b", f"host=root@{b.addr}").ok()
        image = counter_image(base / "m.raw", FILL, churn_pages=CHURN)
        a.cbsd("bcreate", "jname=m", f"image={image}", "vm_os_type=other",
               f"vm_ram={RAM_MIB}m", "vm_ramfile=off").ok()
        a.cbsd("bset", "m", "ha_node=b").ok()  # ha=0: the bench runs each one itself
        a.cbsd("bstart", "m").ok()
        log = a.cbsd.system("m") / "console.log"
        wait_counting(log, FILL, timeout=1800)
        ticks = _ticks_for(SHARE * (RAM_MIB << 20), CHURN)
        began: list[float] = []
        mark = 0
        with GapWatch(log) as watch:
            for i in range(repeat + 1):
                if i:
                    _until_ticks(log, mark + ticks)
                settle()
                mark = _ticks(log)
                t = time.perf_counter()
                began.append(t)
                r = a.cbsd("bcheckpoint", "mode=replicate", "jname=m", timeout=1800).ok()
                end = time.perf_counter()
                m = SHIPPED.search(r.out)
                assert m, r.out
                who = NEXT if i else FULL
                shipped.add(who, 100 * (int(m[2]) + int(m[3])) / (RAM_MIB << 20))
                manifest = a.cbsd.system("m") / "checkpoints" / f"ha-{m[1]}.ckp" / \
                    "manifest.json"
                pause.add(who, 1000 * float(json.loads(manifest.read_text())
                                            ["timings"]["guest_gap"]))
                silence.add(who, 1000 * watch.max_gap(t, end))
                whole.add(who, end - t)
        a.cbsd("bstop", "m", "noacpi=1").ok()
    finally:
        cluster.remove(switch, made)
        subprocess.run(["rm", "-rf", str(base)], check=False)
    gaps = [y - x for x, y in itertools.pairwise(began)]
    notes = [f"guest: {RAM_MIB} MiB of RAM, {FILL} MiB of it random, rewriting {CHURN} pages "
             f"per tick; {ticks} ticks ({SHARE:.0%} of its RAM) from one replication's start "
             f"to the next: an interval of {min(gaps):.0f}-{max(gaps):.0f} s here",
             "shipped: the memory chunks the standby lacked plus the disk delta (a qcow2 of "
             "the clusters written since the last acknowledged generation; the first ships "
             "the whole image)"]
    for c in (shipped, pause, silence, whole):
        c.notes += notes
    versions = {"ssh": subprocess.run(["ssh", "-V"], capture_output=True,
                                      text=True).stderr.strip()}
    return [shipped, pause, silence, whole], versions


def _ticks(log: Path) -> int:
    return len(re.findall(rb"n=\d+", log.read_bytes()))


def _until_ticks(log: Path, count: int, timeout: float = 1800) -> None:
    deadline = time.monotonic() + timeout
    while _ticks(log) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the guest writing {log} stopped counting")
        time.sleep(0.1)


def write(cases: list[Case], versions: dict[str, str], study: Study = STUDY) -> str:
    study.save_results(cases, versions)
    lines = report_header("Replication to a standby", "replicate", "bench_replicate",
                          "what replication guarantees: docs/cluster.md.",
                          f"- {versions['ssh']}")
    units = {0: "%", 1: "ms", 2: "ms", 3: "s"}
    for i, c in enumerate(cases):
        lines += c.table(units.get(i, ""))
        lines += [f"- {n}" for n in c.notes] + [""]
    lines += ["Targets (issue 25): shipped per interval <= 10% of RAM, the guest's longest "
              "pause per interval <= 150 ms. Not asserted by any test: this is a study.", ""]
    return study.publish(lines)
