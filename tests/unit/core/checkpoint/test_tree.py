"""The checkpoint tree's pure parts as tables: rendering and retention."""

from __future__ import annotations

import pytest

from cbsd.core.checkpoint.tree import beyond_keep, render


@pytest.mark.parametrize(("states", "here", "lines"), [
    ([], None, []),
    ([("a", None, "")], "a", ["  a *"]),
    ([("a", None, ""), ("b", "a", ""), ("c", "b", "")], None,
     ["  a", "  └─ b", "     └─ c"]),
    ([("base", None, ""), ("a", "base", ""), ("b", "base", ""), ("c", "b", "")], "c",
     ["  base", "  ├─ a", "  └─ b", "     └─ c *"]),
    # Two roots; a parent that no longer exists counts as none; notes follow the name.
    ([("a", None, ""), ("x", "gone", " (damaged)"), ("b", "a", "")], None,
     ["  a", "  └─ b", "  x (damaged)"]),
    # Siblings under a non-last sibling get the vertical bar.
    ([("r", None, ""), ("a", "r", ""), ("a1", "a", ""), ("b", "r", "")], None,
     ["  r", "  ├─ a", "  │  └─ a1", "  └─ b"]),
    # Hand-made cycles and self-parents never loop: each state is listed once.
    ([("a", "b", ""), ("b", "a", "")], None, ["  a", "  b"]),
    ([("a", "a", "")], None, ["  a"]),
])
def test_render(states: list[tuple[str, str | None, str]], here: str | None,
                lines: list[str]) -> None:
    assert render(states, here) == lines


@pytest.mark.parametrize(("names", "keep", "new", "removed"), [
    (["a", "b", "c"], 3, "c", []),
    (["a", "b", "c"], 2, "c", ["a"]),
    (["a", "b", "c"], 1, "c", ["a", "b"]),
    (["c", "a", "b"], 1, "c", ["a", "b"]),  # the new one is never removed, wherever it sorts
    (["new"], 1, "new", []),
    ([], 5, "new", []),
])
def test_beyond_keep(names: list[str], keep: int, new: str, removed: list[str]) -> None:
    assert beyond_keep(names, keep, new) == removed
