"""The layer rule (ARCHITECTURE.md), checked on the import graph of the installed package's source.

Layers, lowest first: the core (modules directly in ``medgemma_gguf``), ``runtime``, ``quant_eval``,
``convert`` (with ``convert.quantize``), ``fixtures``, then the entry points (``medgemma_gguf`` itself,
whose lazy ``load`` is the runtime's, and ``medgemma_gguf.cli``, which loads the stages' commands by name).
A module imports only from its own layer or lower ones; no import cycles, also through imports inside
functions; no module imports another stage's private names; nothing imports the stages by their old
top-level names.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import medgemma_gguf

PACKAGE_DIRS = {"medgemma_gguf": Path(medgemma_gguf.__file__).parent}
for _stage in ("convert", "runtime", "quant_eval", "fixtures"):
    PACKAGE_DIRS[f"medgemma_gguf.{_stage}"] = Path(importlib.import_module(f"medgemma_gguf.{_stage}").__file__).parent

LAYERS = ("core", "runtime", "quant_eval", "convert", "fixtures", "entry")
OLD_NAMES = ("convert", "runtime", "quant_eval", "fixtures")


def _modules() -> dict[str, Path]:
    modules: dict[str, Path] = {}
    for package, folder in PACKAGE_DIRS.items():
        nested = [p for p in PACKAGE_DIRS if p != package and p.startswith(package + ".")]
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join((package, *parts)).removesuffix(".__init__")
            if any(name == p or name.startswith(p + ".") for p in nested):
                continue  # a mapped stage, walked under its own name
            modules[name] = path
    return modules


MODULES = _modules()


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in ("cli", "__main__"):
        return "entry"
    return parts[1] if parts[1] in ("convert", "runtime", "quant_eval", "fixtures") else "core"


def stage(module: str) -> str:
    return layer(module) if layer(module) != "entry" else "core"


def _resolve(name: str) -> str | None:
    """The project module an import of ``name`` refers to (a module, or the module defining the name)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str) -> list[tuple[str, str, int]]:
    """(imported project module, imported name or '', line) for every import in ``module``, at any depth."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append((alias.name, "", node.lineno))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.append((full if full in MODULES else node.module, alias.name, node.lineno))
    return found


def test_the_walk_found_every_stage() -> None:
    for name in ("medgemma_gguf.manifest", "medgemma_gguf.runtime.chat", "medgemma_gguf.quant_eval.metrics",
                 "medgemma_gguf.convert.converter", "medgemma_gguf.convert.quantize.folder",
                 "medgemma_gguf.fixtures.demo", "medgemma_gguf.cli"):
        assert name in MODULES


@pytest.mark.parametrize("module", sorted(MODULES))
def test_lower_layers_never_import_higher_ones(module: str) -> None:
    own = LAYERS.index(layer(module))
    for imported, _, line in imports_of(module):
        if imported.split(".")[0] in OLD_NAMES:
            pytest.fail(f"{module}:{line} imports {imported!r} by its old top-level name; use medgemma_gguf.*")
        target = _resolve(imported)
        if target is None:
            continue
        assert LAYERS.index(layer(target)) <= own, (
            f"{module}:{line} ({layer(module)}) imports {target} ({layer(target)}), a higher layer")


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_private_names_across_stages(module: str) -> None:
    for imported, name, line in imports_of(module):
        target = _resolve(imported)
        if target is None or not name.startswith("_") or name.startswith("__"):
            continue
        assert stage(target) == stage(module), f"{module}:{line} imports the private {target}.{name}"


def test_no_import_cycles() -> None:
    graph = {m: sorted({t for i, _, _ in imports_of(m) if (t := _resolve(i)) and t != m and not
                        (m.startswith(t + ".") and MODULES[t].name == "__init__.py")}) for m in MODULES}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
