#!/usr/bin/env bash
# The demo: a Linux VM is created, checkpointed, changed, stopped, and restored; its uptime,
# RAM counter and disk carry on from the checkpoint without a reboot.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/demo.py "$@"
