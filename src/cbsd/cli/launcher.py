"""The `cbsd` command as an isolated launcher: `python -I -S` with the import paths site would
add. pip's generated script runs site processing (.pth files) and imports `re` before cbsd's
first line -- about half of what a pause costs in all (docs/architecture.md).

    python -m cbsd.cli.launcher DEST     write the launcher for this Python to DEST

scripts/setup.sh runs it for the project's venv; a pip user runs it with the Python cbsd was
installed into (e.g. `python3 -m cbsd.cli.launcher /usr/local/bin/cbsd`).
"""

from __future__ import annotations

import os
import sys
import sysconfig


def launcher_text(python: str, paths: list[str]) -> str:
    return (f"#!{python} -IS\n"
            "# Written by cbsd.cli.launcher: an isolated start (-I -S) with the paths site "
            "would add.\n"
            "import sys\n"
            f"sys.path += {paths!r}\n"
            "from cbsd.cli.main import main\n"
            "sys.exit(main())\n")


def write(dest: str, extra_paths: list[str] | None = None) -> None:
    paths = list(extra_paths or [])
    paths += dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    tmp = f"{dest}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(launcher_text(sys.executable, paths))
    os.chmod(tmp, 0o755)
    os.replace(tmp, dest)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        print("usage: python -m cbsd.cli.launcher DEST [EXTRA_PATH ...]", file=sys.stderr)
        sys.exit(2)
    write(sys.argv[1], sys.argv[2:])
