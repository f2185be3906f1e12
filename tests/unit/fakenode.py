"""A fake node for cbsd's node commands: an `ssh` first on the PATH and a `cbsd` it runs
there (CBSD_REMOTE_CBSD), so Node.argv/run/call/checked and the callers' handling of each
answer run as they do against a real node. What is fake: ssh reaches no host (the command
runs here, through sh, as sshd would hand it to the node's shell), and the node's cbsd answers
from a table the test writes: "ARGS" -> {"out", "err", "rc"}. A host named `unreachable`
fails as ssh does when it cannot connect (exit 255, ssh's message); an arg list with no entry
fails as a cbsd would (exit 2, one line). Every call is recorded."""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

SSH = """#!/bin/sh
# ssh [options] -- HOST COMMAND: run COMMAND here as the node's shell would.
while [ "$1" != "--" ]; do shift; done
shift
if [ "$1" = unreachable ]; then
    echo "ssh: connect to host unreachable port 22: Connection refused" >&2
    exit 255
fi
exec sh -c "$2"
"""


class FakeNode:
    def __init__(self, home: Path) -> None:
        self.home = home
        (home / "bin").mkdir(parents=True, exist_ok=True)
        ssh = home / "bin" / "ssh"
        ssh.write_text(SSH)
        ssh.chmod(0o755)
        self.cbsd = f"{sys.executable} {Path(__file__).resolve()} {home}"
        self.answers: dict[str, dict[str, Any]] = {}
        self._write()

    def env(self) -> dict[str, str]:
        """The environment that sends cbsd's ssh here."""
        return {"PATH": f"{self.home / 'bin'}:{os.environ['PATH']}",
                "CBSD_REMOTE_CBSD": self.cbsd}

    def answer(self, args: str, out: str = "", err: str = "", rc: int = 0) -> None:
        self.answers[args] = {"out": out, "err": err, "rc": rc}
        self._write()

    def calls(self) -> list[str]:
        try:
            return (self.home / "calls").read_text().splitlines()
        except FileNotFoundError:
            return []

    def _write(self) -> None:
        (self.home / "answers.json").write_text(json.dumps(self.answers))


def main(home: Path, args: list[str]) -> int:
    line = shlex.join(args)
    with open(home / "calls", "a") as f:
        f.write(line + "\n")
    answer = json.loads((home / "answers.json").read_text()).get(line)
    if answer is None:
        print(f"cbsd: fake node: no answer scripted for: {line}", file=sys.stderr)
        return 2
    sys.stdout.write(answer["out"])
    sys.stderr.write(answer["err"])
    return int(answer["rc"])


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), sys.argv[2:]))
