"""The import graph of keepgym follows the layering of DESIGN.md and STYLE.md.

Every module of the installed layout (``keepgym/``, ``models/``, ``envs/``, ``agents/``, ``experiments/``
at the repository root) is parsed with ``ast`` (nothing is imported). Its ``keepgym.*`` imports are split
into *module-level* ones (run at import time: the module body, class bodies, ``if``/``try`` blocks, but
not ``if TYPE_CHECKING:``) and *function-level* ones (inside a function: run on call). Checked:

* no cycle among module-level imports;
* no ``_private`` name imported from another keepgym module, at any level;
* layers models -> envs -> agents -> experiments: no module-level import of a higher layer.

Known exceptions are listed by name below, each with the file that owns it; an entry that no longer
occurs fails the test, so the lists only shrink.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: source folder -> package it installs as (setup.cfg ``package_dir``)
PACKAGE_DIRS = {
    "keepgym": "keepgym",
    "models": "keepgym.models",
    "envs": "keepgym.envs",
    "agents": "keepgym.agents",
    "experiments": "keepgym.experiments",
}
#: lower layers first; the root package ``keepgym`` (env registration, version) is outside the layering
LAYERS = ("keepgym.models", "keepgym.envs", "keepgym.agents", "keepgym.experiments")

#: (importer, imported) module-level imports of a higher layer that are known and not yet fixed.
LAYER_VIOLATIONS_ALLOWED: set[tuple[str, str]] = set()
#: (importer, module, name) private names imported across modules that are known and not yet fixed.
PRIVATE_IMPORTS_ALLOWED: set[tuple[str, str, str]] = set()


@dataclass(frozen=True)
class Import:
    importer: str  # the importing module
    module: str  # the keepgym module it loads
    name: str | None  # the name taken from it (``from module import name``), None for ``import module``
    module_level: bool  # runs at import time
    line: int


def _modules() -> dict[str, Path]:
    out = {}
    for folder, package in PACKAGE_DIRS.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            out[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return out


MODULES = _modules()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk(node: ast.AST, module_level: bool, type_only: bool):
    """Yield ``(import node, module_level)``; imports under ``if TYPE_CHECKING:`` are skipped (never run)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import | ast.ImportFrom):
            if not type_only:
                yield child, module_level
        elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            yield from _walk(child, False, type_only)
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            for stmt in child.body:
                yield from _walk(ast.Module(body=[stmt], type_ignores=[]), module_level, True)
            for stmt in child.orelse:
                yield from _walk(ast.Module(body=[stmt], type_ignores=[]), module_level, type_only)
        else:
            yield from _walk(child, module_level, type_only)


def _resolve_from(importer: str, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    package = importer if MODULES[importer].stem == "__init__" else importer.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def _imports() -> list[Import]:
    out = []
    for importer, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node, module_level in _walk(tree, True, False):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name == "keepgym" or alias.name.startswith("keepgym."):
                        out.append(Import(importer, alias.name, None, module_level, node.lineno))
                continue
            base = _resolve_from(importer, node)
            if base != "keepgym" and not base.startswith("keepgym."):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in MODULES:  # ``from package import submodule``
                    out.append(Import(importer, sub, None, module_level, node.lineno))
                else:
                    out.append(Import(importer, base, alias.name, module_level, node.lineno))
    return out


IMPORTS = _imports()


def _layer(module: str) -> int | None:
    for i, layer in enumerate(LAYERS):
        if module == layer or module.startswith(layer + "."):
            return i
    return None


def _graph(module_level: bool) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for imp in IMPORTS:
        if imp.module_level == module_level and imp.module in MODULES and imp.module != imp.importer:
            graph[imp.importer].add(imp.module)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_scan_sees_the_package():
    """Guards the other tests against passing on an empty or misread tree."""
    assert {"keepgym", "keepgym.envs.prune_env", "keepgym.envs.evaluators", "keepgym.agents.rl_pruner"} <= set(MODULES)
    assert all(_layer(m) is not None for m in MODULES if m not in ("keepgym", "keepgym.__main__"))
    module_level = _graph(module_level=True)
    assert "keepgym.envs.evaluators" in module_level["keepgym.envs.prune_env"]
    assert "keepgym.envs.prune_env" in module_level["keepgym.envs.ray_backend"]
    # the Ray evaluator is imported only when asked for
    function_level = _graph(module_level=False)
    assert "keepgym.envs.ray_backend" in function_level["keepgym.envs.evaluators"]
    assert "keepgym.envs.ray_backend" not in module_level["keepgym.envs.evaluators"]


def test_tarjan_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_at_module_level():
    assert _cycles(_graph(module_level=True)) == []


def test_no_private_name_imported_from_another_module():
    found = {
        (imp.importer, imp.module, imp.name)
        for imp in IMPORTS
        if imp.name is not None
        and imp.name.startswith("_")
        and not (imp.name.startswith("__") and imp.name.endswith("__"))
        and imp.module != imp.importer
    }
    lines = sorted(
        f"{MODULES[i.importer].relative_to(ROOT)}:{i.line}: from {i.module} import {i.name}"
        for i in IMPORTS
        if (i.importer, i.module, i.name) in found - PRIVATE_IMPORTS_ALLOWED
    )
    assert not lines, "private names imported across modules:\n" + "\n".join(lines)
    stale = PRIVATE_IMPORTS_ALLOWED - found
    assert not stale, f"fixed: remove from PRIVATE_IMPORTS_ALLOWED: {sorted(stale)}"


@pytest.mark.parametrize("importer", sorted(m for m in MODULES if _layer(m) is not None))
def test_layers_only_import_downwards_at_module_level(importer):
    mine = _layer(importer)
    upward = {
        (imp.importer, imp.module)
        for imp in IMPORTS
        if imp.importer == importer
        and imp.module_level
        and _layer(imp.module) is not None
        and _layer(imp.module) > mine
    }
    allowed = {pair for pair in LAYER_VIOLATIONS_ALLOWED if pair[0] == importer}
    assert upward - allowed == set(), f"{importer} imports a higher layer at module level"
    assert allowed - upward == set(), f"fixed: remove from LAYER_VIOLATIONS_ALLOWED: {sorted(allowed - upward)}"


def test_the_scanner_classifies_import_sites():
    source = (
        "from typing import TYPE_CHECKING\n"
        "import keepgym.envs.data\n"
        "if TYPE_CHECKING:\n"
        "    from keepgym.agents import RLPruner\n"
        "class A:\n"
        "    from keepgym.models import create_model\n"
        "def f():\n"
        "    from keepgym.experiments.cli import _private\n"
    )
    found = [(n.lineno, level) for n, level in _walk(ast.parse(source), True, False)]
    assert found == [(1, True), (2, True), (6, True), (8, False)]  # the TYPE_CHECKING import never runs
    relative = ast.parse("from ..models import vgg\n").body[0]
    assert _resolve_from("keepgym.envs.prune_env", relative) == "keepgym.models"
