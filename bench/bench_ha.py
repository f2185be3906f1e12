"""Fencing and failover (python -m bench.run ha -> docs/benchmarks/ha/: report.md,
results.json). Three hosts (network namespaces, each its own etcd member, keeper, sshd and
workdir: tests/guests/cluster.py), the cluster formed through the CLI with a 10 s lease; one
HA counter guest (32 MiB) whose owner and standby swap at each trial.

Each trial: a generation is replicated, the guest runs on for a random part of the HA
interval (where a failure lands between two replications), then the owner is either cut off
(partition: links down, every process still running) or killed (death: every process in its
namespace SIGKILLed, links down). Measured: the time from that moment to the guest's first
counter line on the standby; the state lost -- the owner's last count before the failure
less the standby's first count, in seconds of the guest's counting; and the split brains:
trials in which the two copies' QEMUs ran at once or both consoles advanced within the same
second (sampled every 50 ms). Then the old owner comes back (healed, or started again with
`bcluster mode=start`), its copy must stay stopped (its bstart refused), it is removed there,
and the roles swap."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.guests import cluster, ha
from tests.guests.build import counter_image
from tests.guests.hosts import Host
from tests.vmchecks import counting, last_count

from bench.common import Case, Study, report_header

HA = Study("ha")
TTL, INTERVAL, JNAME = 10, 5.0, "vmh"


def _rate(h: Host) -> float:
    """The guest's counts per second, over a few of its lines."""
    t0, c0 = time.time(), last_count(h.cbsd, JNAME)
    counting(h.cbsd, JNAME, 4)
    return (last_count(h.cbsd, JNAME) - c0) / (time.time() - t0)


def _trial(kind: str, owner: Host, standby: Host, observer: Host,
           cases: dict[str, Case], rng: random.Random) -> None:
    ha.arm(owner, standby, JNAME)
    rate = _rate(owner)
    ha.replicate(owner, JNAME)
    time.sleep(rng.uniform(0, INTERVAL))  # the failure lands somewhere in the interval
    with ha.Consoles([(owner, JNAME), (standby, JNAME)]) as consoles:
        before = last_count(owner.cbsd, JNAME)
        if kind == "partition":
            owner.link(False)
            cut = time.time()
        else:
            cut = ha.die(owner)
        first, seen = ha.first_count(standby, JNAME, timeout=TTL * 12)
        counting(standby.cbsd, JNAME, 2)
    cases["time"].add(kind, seen - cut)
    cases["lost"].add(kind, max(0, before - first) / rate)
    split = consoles.both_running > 0 or consoles.overlaps() > 0
    cases["split"].add(kind, float(split))
    if kind == "partition":
        owner.link(True)
    else:
        ha.revive(owner)
    deadline = time.monotonic() + TTL * 12
    while ha.etcd_get(observer, f"/cbsd/alive/{owner.name}") is None:
        assert time.monotonic() < deadline, f"{owner.name} never came back"
        time.sleep(0.2)
    r = ha.not_busy(owner, "bstart", JNAME)
    assert r.code == 1 and "owned by node" in r.err, (r.code, r.err)
    assert not ha.qemu_running(owner, JNAME)
    ha.not_busy(owner, "bremove", JNAME).ok()


def run_all(partitions: int = 20, deaths: int = 5) -> tuple[list[Case], dict[str, str]]:
    cases = {"time": Case("Time from the failure to the guest running on the standby"),
             "lost": Case("State lost (seconds of the guest's counting)"),
             "split": Case("Split brains (1 per trial in which two copies ran at once)")}
    rng = random.Random(25)
    base = Path(tempfile.mkdtemp(prefix="bench-ha-"))
    switch, made = cluster.make(base / "hosts")
    try:
        cluster.form(made, base, TTL)
        a, b, c = made
        a.cbsd("bcreate", f"jname={JNAME}", f"image={counter_image(base / 'c.raw', 0)}",
               "vm_os_type=other", "vm_ram=32m").ok()
        a.cbsd("bstart", JNAME).ok()
        order = ["partition"] * partitions + ["death"] * deaths
        rng.shuffle(order)
        pair = [a, b]
        for i, kind in enumerate(order):
            owner, standby = pair
            _trial(kind, owner, standby, c, cases, rng)
            pair = [standby, owner]
            print(f"trial {i + 1}/{len(order)} {kind}: "
                  f"{cases['time'].series[kind].samples[-1]:.1f} s", flush=True)
    finally:
        cluster.remove(switch, made)
    for c_ in cases.values():
        c_.notes.append(f"lease (ttl) {TTL} s, fencing margin 2 s, the standby's margin 2 s, "
                        f"HA interval {INTERVAL:.0f} s; guest 32 MiB (the counter guest)")
    etcd = subprocess.run(["etcd", "--version"], capture_output=True, text=True).stdout
    return list(cases.values()), {"etcd": etcd.splitlines()[0] if etcd else "?"}


def write(cases: list[Case], versions: dict[str, str], study: Study = HA) -> str:
    study.save_results(cases, versions)
    lines = report_header("Fencing and failover", "ha", "bench_ha",
                          "what is measured: docs/cluster.md, \"Fencing and failover\".",
                          f"- {versions['etcd']}")
    for c in cases:
        split = c.title.startswith("Split")
        lines += c.table("" if split else "s")
        if split:
            lines += [f"- {n}: **{int(sum(s.samples))} split brains in {len(s.samples)} "
                      "trials**" for n, s in c.series.items()]
        lines += [f"- {n}" for n in c.notes] + [""]
    return study.publish(lines)


if __name__ == "__main__":
    print(write(*run_all(*(int(x) for x in sys.argv[1:3]))))
    os._exit(0)
