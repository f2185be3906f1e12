"""Where the tests' inputs are, computed once from this file's place: test modules live at
different depths (tests/unit/<package>/...), so a `Path(__file__).parents[n]` in each would
break whenever one moves."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SRC = REPO / "src"
SCRIPTS = REPO / "scripts"
UNIT_DATA = REPO / "tests" / "unit" / "data"  # recorded QEMU output, qcow2 headers, manifests
GOLDEN = REPO / "tests" / "unit" / "golden"  # the expected QEMU command lines (test_argv)
