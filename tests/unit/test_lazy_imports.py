"""An import inside a function stays only where it buys start-up time, and says so
(issue 22): a `# lazy:` comment on its line or the line just above names what it keeps light.
Every other import goes to the top of its module, where test_layers.py sees its direction."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
MARK = "# lazy:"


def inside_functions(text: str, name: str) -> set[int]:
    """The lines where an import inside a function (or a method, or a nested one) starts."""
    found: set[int] = set()
    for fn in ast.walk(ast.parse(text, name)):
        if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            found |= {node.lineno for node in ast.walk(fn)
                      if isinstance(node, ast.Import | ast.ImportFrom)}
    return found


def unmarked(path: Path) -> list[str]:
    """'path:line: import' for each import inside a function of *path* without a MARK."""
    text = path.read_text()
    lines = text.splitlines()
    return [f"{path}:{n}: {lines[n - 1].strip()}"
            for n in sorted(inside_functions(text, str(path)))
            if MARK not in lines[n - 1]
            and not (n > 1 and lines[n - 2].strip().startswith(MARK))]


def stray(path: Path) -> list[str]:
    """'path:line: comment' for each MARK that marks no import inside a function (one left
    behind when its import moved up, or put on a module-level one)."""
    text = path.read_text()
    inside = inside_functions(text, str(path))
    return [f"{path}:{n}: {line.strip()}" for n, line in enumerate(text.splitlines(), 1)
            if MARK in line and (n + 1 if line.strip().startswith("#") else n) not in inside]


def test_every_import_inside_a_function_says_why_it_is_there() -> None:
    assert [line for p in sorted(SRC.rglob("*.py")) for line in unmarked(p)] == []


def test_every_lazy_mark_marks_an_import_inside_a_function() -> None:
    assert [line for p in sorted(SRC.rglob("*.py")) for line in stray(p)] == []


def test_the_check_finds_an_unmarked_import(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("import os\n\n\ndef f():\n    import json\n\n\n"
                      "def g():\n    # lazy: only g needs it\n    import sqlite3\n\n\n"
                      "class C:\n    def h(self):\n        def inner():\n"
                      "            from cbsd import debug  # lazy: h is rare\n"
                      "            from cbsd import errors\n")
    assert unmarked(source) == [f"{source}:5: import json", f"{source}:17: from cbsd import errors"]


def test_the_check_finds_a_stray_mark(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("TYPE_CHECKING = False\nif TYPE_CHECKING:\n    # lazy: not a function\n"
                      "    from pathlib import Path\n\n\ndef f():\n    # lazy: moved up\n"
                      "    return 1\n\n\ndef g():\n    import json  # lazy: g is rare\n")
    assert stray(source) == [f"{source}:3: # lazy: not a function", f"{source}:8: # lazy: moved up"]
