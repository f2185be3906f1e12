"""cbsd's imports go one way (docs/architecture.md, "Packages and layers"): every import of one
cbsd module by another -- at the top, inside a function, or under TYPE_CHECKING -- points to
the same layer or a lower one, and no chain of them comes back to where it started.

    cli > service > core.hosts > core.manage > core.checkpoint > core.vm > qemu > storage > base

base: the modules directly in src/cbsd (errors, model, names, specs, ssh, node_answers,
debug, cancel, failpoints), which every layer may use.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
LAYERS = ("base", "storage", "qemu", "core.vm", "core.checkpoint", "core.manage",
          "core.cluster", "core.hosts", "service", "cli")


def module_name(path: Path, root: Path = SRC) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer(module: str) -> int:
    """The rank of *module*'s layer (LAYERS' index): the longest prefix that names one."""
    rest = module.removeprefix("cbsd").lstrip(".")
    for rank in range(len(LAYERS) - 1, 0, -1):
        name = LAYERS[rank]
        if rest == name or rest.startswith(name + "."):
            return rank
    if rest in ("core", "__main__"):
        return len(LAYERS) if rest == "__main__" else LAYERS.index("core.vm")
    return 0


def imports(path: Path, modules: set[str], root: Path = SRC) -> set[str]:
    """The cbsd modules *path* imports anywhere in it (a package's __init__ counts when a
    name imported from the package is not a module of its own)."""
    me = module_name(path, root)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "cbsd"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            if target.split(".")[0] != "cbsd":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in modules else target)
    return found - {me}


def graph() -> dict[str, set[str]]:
    paths = sorted(SRC.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports(p, modules) for p in paths}


def upward(edges: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} -> {b}" for a, targets in edges.items() for b in targets
                  if layer(b) > layer(a))


def cycle(edges: dict[str, set[str]]) -> list[str]:
    """One import cycle (its modules in order), or [] if there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str]:
        state[m] = 1
        path.append(m)
        for n in sorted(edges.get(m, ())):
            if state.get(n) == 1:
                return [*path[path.index(n):], n]
            if n not in state and (found := visit(n)):
                return found
        state[m] = 2
        path.pop()
        return []

    for m in sorted(edges):
        if m not in state and (found := visit(m)):
            return found
    return []


def test_no_import_points_to_a_higher_layer() -> None:
    assert upward(graph()) == []


def test_no_import_cycle() -> None:
    assert cycle(graph()) == []


@pytest.mark.parametrize(("module", "rank"), [
    ("cbsd.errors", 0), ("cbsd.specs", 0), ("cbsd.storage.inventory", 1), ("cbsd.qemu.qmp", 2),
    ("cbsd.core.vm.recovery", 3), ("cbsd.core.checkpoint.save", 4),
    ("cbsd.core.manage.lifecycle", 5), ("cbsd.core.cluster.owner", 6),
    ("cbsd.core.hosts.move", 7), ("cbsd.service", 8), ("cbsd.cli.main", 9),
])
def test_layers_are_ranked(module: str, rank: int) -> None:
    assert layer(module) == rank


def test_the_checks_see_an_upward_import_and_a_cycle() -> None:
    """The test above can fail: an import inside a function, upward, is found, and so is a
    cycle made only of imports inside functions."""
    edges = graph()
    assert "cbsd.core.vm.recovery" in edges
    planted = {**edges, "cbsd.core.vm.recovery": edges["cbsd.core.vm.recovery"] |
               {"cbsd.core.hosts.move"}}
    assert upward(planted) == ["cbsd.core.vm.recovery -> cbsd.core.hosts.move"]
    loop = cycle(planted)
    assert loop[0] == loop[-1] and "cbsd.core.vm.recovery" in loop


def test_imports_inside_functions_and_type_checking_count(tmp_path: Path) -> None:
    pkg = tmp_path / "cbsd"
    pkg.mkdir()
    source = pkg / "a.py"
    source.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                      "    from cbsd import b\ndef f():\n    from cbsd.c import d\n")
    assert imports(source, {"cbsd.b", "cbsd.c.d"}, tmp_path) == {"cbsd.b", "cbsd.c.d"}
