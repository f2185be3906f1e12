"""Other hosts (nodes), reached with OpenSSH: no daemon and no protocol of cbsd's own.

cbsd on a node is run as `ssh -p PORT -- HOST 'cbsd ARG ...'`. ssh hands the command to the
node's shell, so every argument is quoted for it (shlex.quote); host= is checked so it cannot
be read as an ssh option. Authentication is the user's SSH keys (BatchMode: never a password
prompt) and the node's host key is checked as ssh always does, against known_hosts: cbsd
never relaxes that (docs/many-hosts.md says how to add a node's key). The node's own login
environment decides its workdir and which cbsd runs (CBSD_REMOTE_CBSD here names the command,
default `cbsd`). CBSD_SSH_CONFIG names an ssh_config file for cbsd's ssh (`ssh -F`: e.g. a
key and known_hosts of cbsd's own); its checks stay ssh's.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any, TypeVar

from cbsd import node_answers
from cbsd.errors import NodeError, UsageError

T = TypeVar("T")


# Neither the user nor the address may begin with "-": ssh would read it as an option.
_HOST_RE = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*@)?[A-Za-z0-9][A-Za-z0-9.:_-]*")


SSH_OPTIONS = ("-o", "BatchMode=yes", "-o", "ConnectTimeout=10",
               "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=6")


SSH_FAILED = 255  # ssh's own exit code when it could not connect or authenticate


@dataclass(frozen=True)
class Node:
    name: str
    host: str
    port: int = 22

    def argv(self, args: list[str], *, tty: bool = False) -> list[str]:
        remote = os.environ.get("CBSD_REMOTE_CBSD", "cbsd")
        command = " ".join(shlex.quote(a) for a in [*shlex.split(remote), *args])
        config = os.environ.get("CBSD_SSH_CONFIG")
        return ["ssh", *(["-F", config] if config else []), *SSH_OPTIONS,
                *(["-t"] if tty else ["-T"]), "-p", str(self.port), "--", self.host, command]

    def run(self, args: list[str], *, stdin: IO[bytes] | int | None = subprocess.DEVNULL,
            timeout: float | None = 600) -> subprocess.CompletedProcess[bytes]:
        """cbsd ARGS on the node, output captured; NodeError if ssh could not get there."""
        try:
            res = subprocess.run(self.argv(args), stdin=stdin, capture_output=True,
                                 timeout=timeout, check=False)
        except FileNotFoundError:
            raise NodeError("ssh is not installed (apt install openssh-client)") from None
        except subprocess.TimeoutExpired:
            raise NodeError(f"node {self.name}: no answer from {self.host} in {timeout:.0f} "
                            "s") from None
        if res.returncode == SSH_FAILED:
            raise self.failed(res.returncode, res.stderr)
        return res

    def failed(self, returncode: int, err: bytes) -> NodeError:
        """What an ssh that ended with *returncode* and *err* on stderr means: ssh itself
        failed (255 with no cbsd message), the command there ended without a word (255,
        nothing said: killed), or cbsd there failed (its last line and exit code)."""
        if returncode == SSH_FAILED and not err.strip().startswith(b"cbsd"):
            if not err.strip():
                return NodeError(f"node {self.name}: the command there ended without an "
                                 "answer")
            return NodeError(f"node {self.name}: cannot reach {self.host}: {why(err)}")
        # 255 is ssh's code (cbsd there said something, then was killed): not cbsd's own
        return NodeError(f"node {self.name}: {last_line(err)}",
                         1 if returncode == SSH_FAILED else returncode)

    def call(self, args: list[str], **kw: Any) -> str:
        """cbsd ARGS on the node; its stdout, or NodeError with its one-line message."""
        res = self.run(args, **kw)
        if res.returncode != 0:
            raise NodeError(f"node {self.name}: {last_line(res.stderr)}", res.returncode)
        return res.stdout.decode(errors="replace")

    def call_json(self, args: list[str], **kw: Any) -> Any:
        out = self.call([*args, "format=json"], **kw)
        try:
            return json.loads(out)
        except (ValueError, RecursionError):  # RecursionError: nested beyond reason
            raise NodeError(f"node {self.name}: cbsd there answered what is not JSON (is it "
                            "a cbsd of this version?)") from None

    def checked(self, what: str, check: Callable[[Any], T], answer: Any) -> T:
        """*answer* (to *what*) through its validator (cbsd/node_answers.py); a NodeError
        naming this node and the fault if it is not of the expected shape."""
        try:
            return check(answer)
        except node_answers.BadAnswer as e:
            why = str(e)
        except (TypeError, ValueError, ArithmeticError, RecursionError):
            why = "of another shape"  # a validator that missed a case still refuses
        raise NodeError(f"node {self.name}: its answer to {what} is not what cbsd "
                        f"expects: {why} (is it a cbsd of this version?)")


def last_line(err: bytes) -> str:
    """The last line a node (or ssh) wrote on stderr, as it may be shown here: control
    characters replaced and cut short (a node's words must not drive this terminal)."""
    lines = [ln for ln in err.decode(errors="replace").splitlines() if ln.strip()]
    return node_answers.printable(lines[-1].strip()) if lines else "failed without a message"


def why(err: bytes) -> str:
    text = err.decode(errors="replace")
    if "Host key verification failed" in text or "REMOTE HOST IDENTIFICATION" in text:
        return ("its SSH host key is not the one known_hosts holds, or not known yet: check "
                "the key's fingerprint and add it (see docs/many-hosts.md)")
    if "Permission denied" in text:
        return "SSH refused the login: set up key authentication for it"
    return last_line(err)


def check_host(host: str) -> str:
    if not _HOST_RE.fullmatch(host):
        raise UsageError(f"node: bad host '{host}' (use [USER@]ADDRESS)")
    return host


def die_with_parent(parent: int) -> Callable[[], None]:
    """A preexec_fn that has the kernel SIGKILL the child when *parent* (this process) ends,
    however it ends, kill -9 included (prctl PR_SET_PDEATHSIG): for helpers such as an
    `ssh -N` forwarder that would otherwise outlive cbsd for good. It runs between fork and
    exec, so it does the least: one libc call and one check (no shell is involved).
    The kernel ties the signal to the *thread* that forked, not the process: start such a
    helper from a thread that outlives its use (the main thread, in every command today)."""
    # lazy: ctypes is heavy and only the ssh helpers that outlive a fork need prctl
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1

    def preexec() -> None:
        libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl: nothing would tell us
            os._exit(1)

    return preexec
