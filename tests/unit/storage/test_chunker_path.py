"""Which of fastcdc's implementations the chunk store runs: its C accelerator (what
scripts/setup.sh installs and checks on every supported platform) or, where that was not
built, the pure-Python fallback, ~100x slower, which cbsd names once on stderr. Both cut the
same chunks: recipes made by either are the same."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

from cbsd.storage.chunkstore import SLOW_NOTICE, accelerator_installed, native_chunker
from tests import paths

SRC = str(paths.SRC)
# Folds two streams in a fresh interpreter, the C accelerator hidden when argv[2] says so, and
# prints each recipe's chunk lengths.
FOLD = """
import json, sys
if sys.argv[2] == "pure":
    sys.modules["fastcdc.fastcdc_cy"] = None  # what a Python without the built accelerator sees
from pathlib import Path
from cbsd.storage.chunkstore import Store
store, out = Store(Path(sys.argv[1]) / sys.argv[2]), []
for name in ("a", "b"):
    recipe, _ = store.fold(Path(sys.argv[1]) / name, [])
    out.append([e[3] for e in recipe.entries])
print(json.dumps(out))
"""


def _fold(tmp: Path, mode: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", FOLD, str(tmp), mode], capture_output=True,
                          text=True, check=True, env={"PYTHONPATH": SRC, "PATH": "/usr/bin"})


def test_installed_chunker_is_the_fast_one() -> None:
    assert native_chunker(), "fastcdc runs in pure Python: scripts/setup.sh must build it"


def test_slow_path_is_named_once_and_cuts_the_same_chunks(tmp_path: Path) -> None:
    rnd = random.Random(3)
    for name in ("a", "b"):
        (tmp_path / name).write_bytes(rnd.randbytes(600 << 10))
    fast, slow = _fold(tmp_path, "native"), _fold(tmp_path, "pure")
    assert fast.stderr == ""
    assert slow.stderr.splitlines() == [SLOW_NOTICE]  # once, for two folds
    assert "pure python" not in slow.stdout.lower()  # fastcdc's own notice is kept off stdout
    assert json.loads(slow.stdout) == json.loads(fast.stdout)
    assert len(json.loads(fast.stdout)[0]) > 10


def test_the_accelerator_is_seen_without_importing_fastcdc(tmp_path: Path) -> None:
    """What a command that starts a detached fold checks (and says) costs no fastcdc import."""
    assert accelerator_installed() == native_chunker()
    probe = ("import sys; from cbsd.storage.chunkstore import accelerator_installed as a; "
             "print(a(), 'fastcdc' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, env={"PYTHONPATH": SRC, "PATH": "/usr/bin"}).stdout
    assert out.split() == ["True", "False"]
    # A package without the built extension (a Python no wheel fits, no compiler): not seen.
    fake = tmp_path / "fastcdc"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise SystemExit('imported')\n")
    (fake / "fastcdc_py.py").write_text("")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, env={"PYTHONPATH": f"{tmp_path}:{SRC}",
                                          "PATH": "/usr/bin"}).stdout
    assert out.split() == ["False", "False"]
