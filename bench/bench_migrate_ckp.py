"""bmigrate with and without checkpoints: the downtime and the whole command
(python -m bench.run migrate-checkpoints -> docs/benchmarks/hosts-migrate-checkpoints/).

The guest of the many-hosts study (bench/bench_hosts.py: 1 GiB, 768 MiB of random RAM, the
counter guest's 1 MiB disk, vm_dedup=off so its checkpoints are plain files) between the same
two hosts (network namespaces, each with its own sshd: tests/guests/hosts.py). Each repetition
migrates it once with two checkpoints (c2 a child of c1, both carried) and once without
(destroyall first), then makes the two checkpoints again on the host it is on: the two cases
alternate, so load on the shared machine falls on both alike. The downtime is what cbsd reports
(QEMU's own downtime plus the time until the node has registered the VM and it runs)."""

from __future__ import annotations

import re
import subprocess
import tempfile
import time
from pathlib import Path

from bench.bench_hosts import FILL, RAM, pair_running_m
from bench.common import Case, Study, report_header
from bench.timing import settle

STUDY = Study("hosts-migrate-checkpoints")
WITH, WITHOUT = "with 2 checkpoints (carried)", "without checkpoints"


def run_all(repeat: int = 5) -> tuple[list[Case], dict[str, str]]:
    from tests.guests import hosts as twohosts

    base = Path(tempfile.mkdtemp(prefix="cbsd-bench-migrate-ckp-", dir="/var/tmp"))
    down = Case("bmigrate downtime (reported: QEMU's downtime + until running there)")
    whole = Case("bmigrate, whole command (checkpoints shipped, disks mirrored, memory migrated)")
    a, b = pair_running_m(base)
    try:
        here, there = a, b
        for _ in range(repeat):
            for case in (WITH, WITHOUT):
                if case == WITH:
                    for c in ("c1", "c2"):
                        here.cbsd("bcheckpoint", "mode=create", "jname=m", f"name={c}").ok()
                else:
                    here.cbsd("bcheckpoint", "mode=destroyall", "jname=m").ok()
                settle()
                t = time.perf_counter()
                r = here.cbsd("bmigrate", "jname=m", f"node={there.name}", timeout=1800).ok()
                whole.add(case, time.perf_counter() - t)
                m = re.search(r"downtime ([0-9]+) ms", r.out)
                assert m, r.out
                down.add(case, float(m[1]) / 1000)
                here, there = there, here
                time.sleep(2)
    finally:
        twohosts.remove((a, b))
        subprocess.run(["rm", "-rf", str(base)], check=False)
    for c in (down, whole):
        c.notes.append(f"guest: {RAM} RAM ({FILL} MiB of it random), a 1 MiB disk (the counter "
                       "guest's); each checkpoint: its memory stream and its disk snapshot")
    versions = {"ssh": subprocess.run(["ssh", "-V"], capture_output=True,
                                      text=True).stderr.strip()}
    return [down, whole], versions


def write(cases: list[Case], versions: dict[str, str], study: Study = STUDY) -> str:

    study.save_results(cases, versions)
    lines = report_header("bmigrate with checkpoints", "migrate-checkpoints",
                          "bench_migrate_ckp", "what bmigrate guarantees: docs/many-hosts.md.",
                          f"- {versions['ssh']}")
    for c in cases:
        lines += c.table()
        w, wo = c.series.get(WITH), c.series.get(WITHOUT)
        if w and wo:
            lines.append(f"- difference of the medians (with - without): "
                         f"**{(w.median - wo.median) * 1000:+.0f} ms**")
        lines += [f"- {n}" for n in c.notes] + [""]
    return study.publish(lines)
