"""Benchmark entry point: python -m bench.run [case ...]  (cases: bls; default all)."""

from __future__ import annotations

import sys


def main(argv: list[str]) -> None:
    cases = argv or ["bls"]
    print("| case | median | min | max | runs |\n|---|---|---|---|---|")
    for case in cases:
        if case == "bls":
            from bench import bench_bls

            for s in bench_bls.run():
                print(s.row(), flush=True)
        else:
            raise SystemExit(f"unknown case {case!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
