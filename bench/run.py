"""Benchmark entry point: python -m bench.run [case ...]

cases: peer (cbsd vs libvirt vs floor, writes docs/benchmarks.md, .png and .json; default),
       report (re-render docs/benchmarks.md and .png from docs/benchmarks.json),
       checkpoint (cbsd vs the dd floor only), bls,
       engine (restore vs RAM size per engine, space of many checkpoints; writes
       docs/benchmarks-engine.md, .json and .png; BENCH_ENGINE_SIZES=256m:200,1g:768 for a
       quick run),
       hosts (bexport/bimport/bmove against cat and ssh of the same bytes, bmove downtime;
       writes docs/benchmarks-hosts.md and .json)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT_BENCH = Path(__file__).resolve().parent


def main(argv: list[str]) -> None:
    cases = argv or ["peer"]
    for case in cases:
        if case == "peer":
            from bench import bench_peer, report

            results, versions = bench_peer.run_all()
            analysis = (ROOT_BENCH / "analysis.md")
            print(report.write(results, versions,
                               analysis.read_text() if analysis.exists() else ""))
            continue
        if case == "report":
            from bench import report
            from bench.common import load_cases

            results, versions = load_cases(ROOT_BENCH.parent / "docs" / "benchmarks.json")
            analysis = ROOT_BENCH / "analysis.md"
            report.write(results, versions, analysis.read_text() if analysis.exists() else "")
            continue
        if case == "engine":
            from bench import bench_engine

            print(bench_engine.write(*bench_engine.run_all()), flush=True)
            continue
        if case == "hosts":
            from bench import bench_hosts

            print(bench_hosts.write(*bench_hosts.run_all()), flush=True)
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
