"""Starting a helper process that outlives the command: the one way every module does it.

The helper gets its own session (a Ctrl-C or SIGHUP meant for the command's process group
does not reach it), no descriptor but /dev/null on 0-2 (a pipe the caller's caller reads
would otherwise stay open until the helper ends) and none of the command's other descriptors
(a lock file's descriptor would otherwise keep the lock). The command does not wait for it.
Base level: imports nothing of cbsd.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence


def start_detached(argv: Sequence[str], pass_fds: Sequence[int] = ()
                   ) -> subprocess.Popen[bytes]:
    """Start *argv* detached (see the module's docstring); OSError if it cannot start.
    *pass_fds*: descriptors the helper is meant to share (a pipe whose end tells it that the
    command ended), under the same numbers."""
    return subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True,
                            pass_fds=tuple(pass_fds))
