"""Named points where a test can stop cbsd to inject a fault (kill -9, a signal, a full disk,
a dying QEMU) at exactly that moment, as storage systems' failpoints do.

With CBSD_FAILPOINT=NAME in the environment, reaching point NAME prints
``cbsd: failpoint NAME`` on stderr and stops the process (SIGSTOP) until the test continues
or kills it; it fires once per process (other threads then pass it). Without the variable
this is one dictionary lookup.
"""

from __future__ import annotations

import os
import signal
import sys

_fired: set[str] = set()


def failpoint(name: str) -> None:
    if os.environ.get("CBSD_FAILPOINT") == name and name not in _fired:
        _fired.add(name)

        print(f"cbsd: failpoint {name}", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGSTOP)
