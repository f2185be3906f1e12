"""The cluster-wide listings (issue 25: "bls and bwhereis of the whole cluster ... 1,000 VMs on
three nodes in <= 0.3 s"): python -m bench.run cluster -> docs/benchmarks/cluster/ (report.md,
results.json; no chart).

A real three-member etcd cluster: the three hosts of the cluster tests (tests/guests/cluster.py:
network namespaces on a bridge, each with its own etcd member, lease keeper and workdir),
formed through the CLI. Each node has one real VM (a's is running: its record says On); 1,000
owner records over the three nodes are written to etcd directly (cluster.seed), as their
nodes' commands would have left them. Every command runs in node c's namespace, as a user on c
runs it: wall time from the process's start to its exit, output read.

- `cbsd bls node='*'` against its floors: `etcdctl get --prefix /cbsd/` (the same range read,
  over the same TLS, by etcd's own Go client: no interpreter to start), `cbsd bls` of 1,000
  VMs in a local inventory (the same listing without a cluster; bench_service.many makes
  them), Python's own start, and the import of etcd3gw alone (what the read no longer loads);
- `cbsd bwhereis` against `etcdctl get` of the VM's key;
- the phases inside one process (the read path's imports, TLS handshake + range read, the
  parsing into rows, the table), to say where the time goes.

With BENCH_CLUSTER_BEFORE=COMMIT, the two commands are also timed as cbsd was at COMMIT (its
src/ from `git archive`, first on PYTHONPATH): the read path through etcd3gw, for comparison.

Series alternate within each repetition; each run starts from a quiet disk (timing.settle)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.guests import cluster

from bench.common import CBSD, ROOT, Case, Study, report_header, workdir_env
from bench.timing import run as timed

TYPE_CHECKING = False
if TYPE_CHECKING:
    from tests.guests.hosts import Host

STUDY = Study("cluster")
VMS = 1000
TARGET = 0.3  # seconds, the issue's
LISTING = "cbsd bls node='*'"
WHEREIS = "cbsd bwhereis"
BEFORE = "the same command at BENCH_CLUSTER_BEFORE (read through etcd3gw)"

# The read path's phases in one process (run in node c's namespace with its workdir).
_PHASES = """
import json, time
t0 = time.perf_counter()
from cbsd.cli import output
from cbsd.core.cluster import nodes, view
from cbsd.storage.paths import Workdir, default_workdir
t1 = time.perf_counter()
cfg, reader = view.reader(Workdir(default_workdir()))
kvs = reader.prefix("/cbsd/")
t2 = time.perf_counter()
rows = view.vm_rows(Workdir(default_workdir()))
t3 = time.perf_counter()
text = output.table(rows, ["node", "jname", "status", "vm_ram", "vm_cpus", "node_state"], True)
t4 = time.perf_counter()
print(json.dumps({"imports": t1 - t0, "read": t2 - t1, "read and parse": t3 - t2,
                  "table": t4 - t3, "records": len(kvs), "bytes": sum(len(k.value) for k in kvs),
                  "rows": len(rows)}))
"""


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def run_all(repeat: int = 15) -> tuple[list[Case], dict[str, str]]:
    load_before = _load()
    with tempfile.TemporaryDirectory(prefix="cbsd-bench-cluster-") as tmp:
        base = Path(tmp)
        switch, made = cluster.make(base / "hosts")
        try:
            cluster.form(made, base)
            for h in made:
                h.cbsd("bcreate", f"real{h.name}", "imgsize=16m", "vm_ram=64m").ok()
            made[0].cbsd("bstart", "reala").ok()
            cluster.seed(made[0], cluster.records(VMS, cluster.NAMES))
            local = base / "local"  # the same count in a plain workdir: bls's own listing
            local.mkdir()
            # lazy: the service bench's helpers, only for this floor
            from bench.bench_service import cli, many

            env = workdir_env(local)
            cli(env, "bcreate", "jname=b0000", "vm_os_type=other", "vm_ram=32m", "imgsize=1m")
            many(env, local, VMS)  # b0000's inventory row copied under 999 names
            before = os.environ.get("BENCH_CLUSTER_BEFORE")
            old = _source_at(before, base / "before") if before else None
            cases = measure(made[2], local, repeat, old)
        finally:
            cluster.remove(switch, made)
    etcd = subprocess.run(["etcd", "--version"], capture_output=True, text=True).stdout
    versions = {"python": sys.version.split()[0], "etcd": etcd.splitlines()[0],
                "load": f"{load_before} before, {_load()} after"}
    if before:
        versions["before"] = before
    return cases, versions


def _source_at(commit: str, into: Path) -> Path:
    """cbsd's src/ as it was at *commit* (for PYTHONPATH)."""
    into.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "src"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into / "src"


def measure(c: Host, local: Path, repeat: int, old: Path | None) -> list[Case]:
    ns = [*c.ns.prefix, "env", f"CBSD_WORKDIR={c.cbsd.workdir}"]
    old_cbsd = [*ns, f"PYTHONPATH={old}", sys.executable, "-m", "cbsd"]
    d = c.cbsd.workdir / "cluster"
    etcdctl = [*ns, "etcdctl", f"--endpoints=https://{c.addr}:2379", "--cacert",
               str(d / "ca.crt"), "--cert", str(d / "node.crt"), "--key", str(d / "node.key")]
    py = [*ns, sys.executable]
    listing = Case(f"bls node='*': {VMS} VMs on three nodes (+3 real), from node c")
    whereis = Case(f"bwhereis: one VM of {VMS} on three nodes, from node c")
    phases = Case(f"bls node='*' inside one process: where the time goes ({VMS} VMs)")
    timed([*ns, CBSD, "bls", "node=*"])  # warm the page cache: every series reads it then
    for i in range(repeat):
        listing.add(LISTING, timed([*ns, CBSD, "bls", "node=*"]))
        listing.add("etcdctl get --prefix /cbsd/ (floor: the same read, Go)",
                    timed([*etcdctl, "get", "--prefix", "/cbsd/"]))
        listing.add(f"cbsd bls, {VMS} VMs in a local inventory (no cluster)",
                    timed([*c.ns.prefix, "env", f"CBSD_WORKDIR={local}", CBSD, "bls"]))
        if old:
            listing.add(BEFORE, timed([*old_cbsd, "bls", "node=*"]))
        listing.add("python -c pass (the interpreter's start)", timed([*py, "-c", "pass"]))
        listing.add("python -c 'import etcd3gw' (the client the read no longer loads)",
                    timed([*py, "-c", "import etcd3gw"]))
        name = f"s{(i * 37) % VMS:04d}"
        whereis.add(WHEREIS, timed([*ns, CBSD, "bwhereis", name]))
        whereis.add("etcdctl get /cbsd/vm/NAME (floor)", timed([*etcdctl, "get",
                                                                f"/cbsd/vm/{name}"]))
        if old:
            whereis.add(BEFORE, timed([*old_cbsd, "bwhereis", name]))
        p = subprocess.run([*py, "-c", _PHASES], capture_output=True, text=True, check=True)
        got = json.loads(p.stdout)
        for k in ("imports", "read", "read and parse", "table"):
            phases.add(k, got[k])
    phases.notes.append(f"the range read of /cbsd/ answers {got['records']} records "
                        f"({got['bytes']} bytes of values); the table has {got['rows']} rows")
    phases.notes.append("imports: the read path's own modules, in a fresh interpreter; read: "
                        "a new TLS connection with the client certificate and one POST "
                        "/v3/kv/range; read and parse: the same read again and the rows made "
                        "from it (view.vm_rows)")
    return [listing, whereis, phases]


def write(cases: list[Case], versions: dict[str, str], study: Study = STUDY) -> str:
    study.save_results(cases, versions)
    lines = report_header(
        "Cluster-wide listings", "cluster", "bench_cluster",
        f"what it means: [analysis.md]({study.analysis('the-cluster-wide-listings')}) "
        "(and docs/cluster.md, \"Cluster-wide listings\").",
        f"- Python {versions['python']}, {versions['etcd']}",
        f"- BENCH_CLUSTER_BEFORE: {versions.get('before', 'not set (no before series)')}",
        f"- load average (1, 5, 15 min): {versions.get('load', 'not recorded')}")
    lines += ["## Target", "", "| target | measured | verdict |", "|---|---|---|"]
    for case, who in ((cases[0], LISTING), (cases[1], WHEREIS)):
        s = case.series[who]
        verdict = "met" if s.median <= TARGET else "**missed**"
        lines.append(f"| {who}, {VMS} VMs on three nodes <= {TARGET} s | median "
                     f"{s.median:.3f} s (max {max(s.samples):.3f} s) | {verdict} |")
    lines.append("")
    for c in cases:
        lines += c.table("s")
        mine = c.series.get(LISTING) or c.series.get(WHEREIS)
        if mine is not None:
            lines += [f"- ratio {mine.name} / {s.name}: {mine.median / s.median:.2f}x"
                      for s in c.series.values() if s is not mine]
        lines += [f"- {n}" for n in c.notes] + [""]
    return study.publish(lines)


if __name__ == "__main__":
    print(write(*run_all(int(sys.argv[1]) if len(sys.argv) > 1 else 15)))
