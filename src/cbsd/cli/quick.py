"""bpause's quick lane, before main() imports anything else (see cbsd/core/pause.py for why).

Only the plainest spelling qualifies: `bpause NAME|jname=NAME [mode=on|off|auto]`, one exact
name, each key at most once, the workdir given by CBSD_WORKDIR or root's default. Everything
else -- masks, several names, --help, a typo -- returns None and goes through the full parser,
which owns every error message.
"""

from __future__ import annotations

import os

from cbsd.core.vm import pause

_MODES = ("on", "off", "auto")


def _plain_name(name: str) -> bool:
    """check_name's rule (cbsd/core/names.py) without `re`: 1-64 of [A-Za-z0-9_-], starting
    with a letter or digit."""
    return (0 < len(name) <= 64 and name.isascii() and name[0].isalnum()
            and name.replace("_", "").replace("-", "").isalnum())


def _root() -> str | None:
    """default_workdir() (cbsd/storage/paths.py) for the cases the lane takes."""
    env = os.environ.get("CBSD_WORKDIR")
    if env:
        return None if ".." in env.split("/") else os.path.abspath(env)
    return "/var/lib/cbsd" if os.geteuid() == 0 else None


def bpause(args: list[str]) -> int | None:
    """Exit code of `bpause ARGS` done through the quick lane, or None: not a case for it."""
    names: list[str] = []
    mode = ""
    for arg in args:
        key, eq, value = arg.partition("=")
        if not eq or key == "jname":
            names.append(value if eq else arg)
        elif key == "mode" and not mode and value in _MODES:
            mode = value
        else:
            return None
    root = _root()
    if len(names) != 1 or not _plain_name(names[0]) or root is None:
        return None
    if os.path.exists(root + "/cluster/config.json"):  # Workdir.cluster_config (no pathlib here)
        return None  # a cluster node: the full command checks ownership in etcd first
    message = pause.quick(root, names[0], mode or "auto")
    if message is None:
        return None
    print(message, flush=True)
    return 0
