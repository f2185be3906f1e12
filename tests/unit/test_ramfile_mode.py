"""What pass 3 (CBSD_TEST_RAMFILE=1, scripts/test.sh) skips stands on one fact: the variable
changes only where the `cbsd` fixture (tests/conftest.py) puts a test's workdir -- cbsd itself
never reads it, and no other test code does (tests/guests/hosts.py only hands it on to the
cbsd of a second host, which does not read it either). Then a test without that fixture runs
in pass 3 exactly as in pass 1, and tests/conftest.py deselects it there."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
READS = re.compile(r"CBSD_TEST_RAMFILE|RAMFILE_MODE")
# Where the variable may appear: the pass that sets it, its definition, the fixture and the
# deselection that use it, the two-host set-up that hands it on, and this test.
ALLOWED = {"scripts/test.sh", "tests/harness.py", "tests/conftest.py", "tests/guests/hosts.py",
           "tests/unit/test_ramfile_mode.py"}


def test_only_the_cbsd_fixture_reads_the_ramfile_mode() -> None:
    found = {str(p.relative_to(ROOT)) for top in ("src", "tests", "bench", "scripts")
             for p in (ROOT / top).rglob("*") if p.is_file() and p.suffix in (".py", ".sh")
             and READS.search(p.read_text(errors="replace"))}
    assert found - ALLOWED == set(), found - ALLOWED
    uses = [ln.strip() for ln in (ROOT / "tests/conftest.py").read_text().splitlines()
            if "RAMFILE_MODE" in ln and not ln.lstrip().startswith(("from ", "import "))]
    # the cbsd fixture's workdir, and the deselection's guard: nothing else
    assert len(uses) == 2 and any("reflink_root" in u for u in uses), uses
