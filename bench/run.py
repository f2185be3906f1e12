"""Benchmark entry point: python -m bench.run [case ...]  (cases: bls, checkpoint)."""

from __future__ import annotations

import sys


def main(argv: list[str]) -> None:
    cases = argv or ["bls", "checkpoint"]
    for case in cases:
        if case == "bls":
            from bench import bench_bls

            print("| case | median | min | max | runs |\n|---|---|---|---|---|")
            for s in bench_bls.run():
                print(s.row(), flush=True)
        elif case == "checkpoint":
            from bench import bench_checkpoint

            print(bench_checkpoint.report(bench_checkpoint.run()), flush=True)
        else:
            raise SystemExit(f"unknown case {case!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
