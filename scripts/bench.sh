#!/usr/bin/env bash
# Benchmarks: cbsd vs libvirt vs the hardware floor, in one run on this machine.
# Sets up what it needs (QEMU, libvirt as FACTS.md describes, matplotlib), then writes
# docs/benchmarks/peer/ (report.md, results.json, chart.png). Takes 10-20 minutes; run nothing else meanwhile.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -c 'import matplotlib' 2>/dev/null || \
    .venv/bin/pip install -q --disable-pip-version-check -e '.[bench]'
exec .venv/bin/python -m bench.run "$@"
