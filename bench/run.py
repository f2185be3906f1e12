"""Benchmark entry point: python -m bench.run [case ...]

Each study writes docs/benchmarks/<study>/: report.md, results.json and chart.png.
cases: peer (cbsd vs libvirt vs floor, study "peer"; default),
       report (re-render peer's report.md and chart.png from its results.json),
       checkpoint (cbsd vs the dd floor only), bls,
       engine (restore vs RAM size per engine, space of many checkpoints; study "engine", or
       BENCH_ENGINE_OUT=NAME for a partial re-run, e.g. engine-ab;
       BENCH_ENGINE_SIZES=256m:200,1g:768 for a quick run),
       hosts (bexport/bimport/bmove against cat and ssh of the same bytes, bmove downtime;
       study "hosts", no chart),
       service (cbsd serve: idle CPU and memory, API list of 11, 101 and 1,001 VMs vs bls,
       event latency, checkpoint create via the API vs the CLI; study "service", no chart),
       migrate-checkpoints (bmigrate's downtime with and without checkpoints; study
       "hosts-migrate-checkpoints", no chart),
       clone (bclone count=N start=1 for N = 1, 4, 16 small guests: time to the last one's
       output, host memory; study "clone", no chart),
       cluster (bls node='*' and bwhereis of 1,000 VMs on a three-member etcd cluster
       against etcdctl and a local listing; study "cluster", no chart),
       replicate (bytes shipped and the guest's pause per replication to a standby; study
       "replicate", no chart),
       ha (fencing and failover on three hosts: time to the guest running on the standby,
       state lost, split brains over 20 partitions and 5 host deaths; study "ha", no
       chart)."""

from __future__ import annotations

import importlib
import sys

# The studies whose module has run_all() -> write(): loaded only when asked for (each
# imports its own set-up).
STUDIES = {
    "engine": "bench_engine",
    "hosts": "bench_hosts",
    "service": "bench_service",
    "migrate-checkpoints": "bench_migrate_ckp",
    "cluster": "bench_cluster",
    "replicate": "bench_replicate",
    "clone": "bench_clone",
    "ha": "bench_ha",
}


def main(argv: list[str]) -> None:
    cases = argv or ["peer"]
    for case in cases:
        if case == "peer":
            from bench import bench_peer, report

            print(report.write(*bench_peer.run_all()))
            continue
        if case == "report":
            from bench import report
            from bench.common import load_cases

            report.write(*load_cases(report.PEER.results))
            continue
        if case in STUDIES:
            study = importlib.import_module(f"bench.{STUDIES[case]}")
            print(study.write(*study.run_all()), flush=True)
            continue
        if case == "bls":
            from bench import bench_bls
            from bench import peer_libvirt as lv

            lv.ensure()
            for c in bench_bls.run():
                print(c.title, {n: round(s.median, 3) for n, s in c.series.items()}, flush=True)
        elif case == "checkpoint":
            from bench import bench_checkpoint

            print(bench_checkpoint.report(bench_checkpoint.run()), flush=True)
        else:
            raise SystemExit(f"unknown case {case!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
