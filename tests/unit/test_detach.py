"""cbsd.detach.start_detached: the one way a helper that outlives the command is started
(storage/atomic.remove_tree_later, core/fold.start_helper)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from cbsd.detach import start_detached
from cbsd.storage.atomic import remove_tree_later

# The child reports what it was given: its session, its stdio, the descriptors it holds.
REPORT = """
import json, os, sys
out = sys.argv[1]
fds = sorted(int(f) for f in os.listdir("/proc/self/fd"))
stdio = [os.readlink(f"/proc/self/fd/{n}") for n in (0, 1, 2)]
with open(out + ".tmp", "w") as f:
    f.write(json.dumps([os.getsid(0), os.getpgid(0), os.getpid(), stdio, fds]))
os.rename(out + ".tmp", out)
"""


def _wait_for(path: Path, deadline: float = 60) -> None:
    end = time.monotonic() + deadline
    while not path.exists():
        assert time.monotonic() < end, f"{path} never appeared"
        time.sleep(0.01)


def test_the_helper_has_its_own_session_and_only_dev_null(tmp_path: Path) -> None:
    out = tmp_path / "report"
    keep = os.open(tmp_path, os.O_RDONLY)  # inheritable: the helper must not get it
    os.set_inheritable(keep, True)
    try:
        p = start_detached([sys.executable, "-I", "-c", REPORT, str(out)])
        assert p.wait(60) == 0
    finally:
        os.close(keep)
    sid, pgid, pid, stdio, fds = json.loads(out.read_text())
    assert sid == pid == pgid and sid != os.getsid(0)
    assert stdio == ["/dev/null"] * 3
    # 0-2 and the one listdir opened to list them: nothing inherited from this process.
    assert len(set(fds) - {0, 1, 2}) == 1


def test_a_helper_that_cannot_start_raises(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        start_detached([str(tmp_path / "no-such-program")])


def test_remove_tree_later_removes_the_tree(tmp_path: Path) -> None:
    tree = tmp_path / ".hidden"
    (tree / "a" / "b").mkdir(parents=True)
    (tree / "a" / "b" / "f").write_bytes(b"x")
    remove_tree_later(tree)
    end = time.monotonic() + 60
    while tree.exists():
        assert time.monotonic() < end
        time.sleep(0.01)
