"""bench/'s modules import one way: no circle among them, counting every import -- at the top,
inside functions (where a circle hides best: nothing fails until that function runs) and under
TYPE_CHECKING. Read from the source with `ast`, so nothing is imported or run."""

from __future__ import annotations

import ast
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def bench_imports(source: str, modules: set[str]) -> set[str]:
    """The bench modules *source* imports anywhere in its tree (ast.walk reaches function
    bodies and `if TYPE_CHECKING:` blocks alike). `from bench import x` counts as bench.x when
    x is a module; relative imports are resolved against the bench package."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # modules of bench/ are one level deep: `.x` and `..` both mean bench
                base = f"bench.{base}" if base else "bench"
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return found & modules


def graph() -> dict[str, set[str]]:
    files = sorted(BENCH.glob("*.py"))
    modules = {f"bench.{f.stem}" for f in files}
    return {f"bench.{f.stem}": bench_imports(f.read_text(), modules) - {f"bench.{f.stem}"}
            for f in files}


def cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import circle, as the path that closes it, or None (depth-first search)."""
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return [*path[path.index(node):], node]
        if node in done:
            return None
        for nxt in sorted(edges.get(node, ())):
            found = visit(nxt, [*path, node])
            if found:
                return found
        done.add(node)
        return None

    return next((c for n in sorted(edges) if (c := visit(n, [])) is not None), None)


def test_the_walk_sees_imports_inside_functions_and_under_type_checking() -> None:
    source = ("from typing import TYPE_CHECKING\nfrom bench.common import Series\n"
              "if TYPE_CHECKING:\n    from bench import report\n"
              "def f() -> None:\n    from bench import timing\n    import bench.guests\n"
              "    from . import run\n")
    modules = {"bench", "bench.common", "bench.report", "bench.timing", "bench.guests",
               "bench.run"}
    assert bench_imports(source, modules) == modules


def test_a_circle_is_found() -> None:
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_bench_has_no_import_circle() -> None:
    edges = graph()
    assert "bench.common" in edges  # the walk found the package
    found = cycle(edges)
    assert found is None, f"bench/ import circle: {' -> '.join(found)}"


def test_common_imports_no_other_bench_module() -> None:
    """bench/common.py is the bottom every study builds on."""
    assert graph()["bench.common"] == set()
