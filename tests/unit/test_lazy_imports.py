"""An import inside a function stays only where it buys start-up time, and says so
(issue 22): a `# lazy:` comment on its line or the line just above names what it keeps light.
Every other import goes to the top of its module, where test_layers.py sees its direction."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
MARK = "# lazy:"


def unmarked(path: Path) -> list[str]:
    """'path:line: import' for each import inside a function of *path* without a MARK."""
    text = path.read_text()
    lines = text.splitlines()
    found: set[int] = set()
    for fn in ast.walk(ast.parse(text, str(path))):
        if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            found |= {node.lineno for node in ast.walk(fn)
                      if isinstance(node, ast.Import | ast.ImportFrom)}
    return [f"{path}:{n}: {lines[n - 1].strip()}" for n in sorted(found)
            if MARK not in lines[n - 1]
            and not (n > 1 and lines[n - 2].strip().startswith(MARK))]


def test_every_import_inside_a_function_says_why_it_is_there() -> None:
    assert [line for p in sorted(SRC.rglob("*.py")) for line in unmarked(p)] == []


def test_the_check_finds_an_unmarked_import(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("import os\n\n\ndef f():\n    import json\n\n\n"
                      "def g():\n    # lazy: only g needs it\n    import sqlite3\n\n\n"
                      "class C:\n    def h(self):\n        def inner():\n"
                      "            from cbsd import debug  # lazy: h is rare\n"
                      "            from cbsd import errors\n")
    assert unmarked(source) == [f"{source}:5: import json", f"{source}:17: from cbsd import errors"]
