#!/usr/bin/env bash
# The whole test suite: lint (ruff), types (mypy --strict), unit tests, and integration tests
# against real QEMU guests.
# Extra arguments go to pytest (e.g. scripts/test.sh -k checkpoint).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests bench scripts
.venv/bin/mypy --strict src/cbsd
exec .venv/bin/python -m pytest "$@"
