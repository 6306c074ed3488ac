"""The layout's rules, read from the source with ``ast`` (nothing is imported, so this runs in well under a second).

Every first-party module is parsed and every ``import`` in it counts (module level, inside functions, under
``if TYPE_CHECKING``), because each of them is a dependency a reader has to follow. Checked:

* no import cycle between modules;
* the layering of PLAN.md: ``common`` (stdlib + pydantic helpers: redaction, config sections) imports only
  itself and every package may import it; ``cdm`` imports no other first-party package; ``registry`` only
  itself; ``sampler`` cdm and registry; ``daemon`` cdm, registry, sampler (and api, for the health app); ``api``
  cdm, registry, sampler; ``cli``, ``bench`` and ``scripts`` anything. ``__main__`` modules are process entry
  points and may import what they start;
* third-party packages a layer must not use: no Kafka, Redis or HTTP framework in ``cdm``; no Kafka or torch in
  ``registry``; no Kafka in ``sampler`` and ``api``.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# those that exist are read
PACKAGES = ("common", "cdm", "registry", "sampler", "daemon", "api", "cli", "bench", "deploy")
SCRIPTS = ("scripts",)  # directories of standalone scripts (no __init__.py), read as "scripts.<name>"
FIRST_PARTY = frozenset((*PACKAGES, *SCRIPTS, "tests"))

MAY_IMPORT: Mapping[str, frozenset[str] | None] = {  # first-party packages each package may import (None: any)
    "common": frozenset({"common"}),
    "cdm": frozenset({"cdm", "common"}),
    "registry": frozenset({"registry", "common"}),
    "sampler": frozenset({"sampler", "cdm", "registry", "common"}),
    "daemon": frozenset({"daemon", "cdm", "registry", "sampler", "api", "common"}),
    "api": frozenset({"api", "cdm", "registry", "sampler", "common"}),
    "cli": None,
    "bench": None,
    "scripts": None,
    "deploy": None,
}
HTTP = frozenset({"http", "fastapi", "starlette", "uvicorn"})
MUST_NOT_USE: Mapping[str, frozenset[str]] = {  # third-party (and stdlib http) top-level names per package
    "common": frozenset({"kafka", "redis", "torch", "diffusers", "numpy", "prometheus_client"}) | HTTP,
    "cdm": frozenset({"kafka", "redis", "prometheus_client", "apscheduler"}) | HTTP,
    "registry": frozenset({"kafka", "torch", "diffusers", "safetensors"}) | HTTP,
    "sampler": frozenset({"kafka"}),
    "api": frozenset({"kafka"}),
}


@dataclass
class Module:
    name: str  # dotted, e.g. "cdm.artifacts" for cdm/artifacts/__init__.py
    path: Path
    imports: set[str] = field(default_factory=set)  # dotted names as written (resolved to modules later)


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _source_files(root: Path) -> Iterator[Path]:
    for package in PACKAGES:
        if (root / package / "__init__.py").is_file():
            yield from sorted((root / package).rglob("*.py"))
    for scripts in SCRIPTS:
        if (root / scripts).is_dir():
            yield from sorted((root / scripts).glob("*.py"))


def _imports(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Every name imported anywhere in ``tree``: ``import a.b`` -> a.b, ``from a.b import c`` -> a.b.c."""
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            target = node.module or ""
            if node.level:  # relative: resolve against this module's package
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            found.update(target if alias.name == "*" else f"{target}.{alias.name}" for alias in node.names)
    return found


def read_modules(root: Path) -> dict[str, Module]:
    modules = {}
    for path in _source_files(root):
        name = _module_name(path, root)
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        modules[name] = Module(name, path, _imports(tree, name, path.name == "__init__.py"))
    return modules


def _resolve(name: str, modules: Mapping[str, Module]) -> str | None:
    """The module ``name`` refers to: itself, or its longest prefix that is a module (``a.b.func`` -> ``a.b``)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def import_graph(modules: Mapping[str, Module]) -> dict[str, set[str]]:
    """module -> the first-party modules it imports (``from pkg import sub`` is pkg.sub; ``from pkg import f``, pkg)."""
    return {
        m.name: {t for t in (_resolve(i, modules) for i in m.imports) if t is not None and t != m.name}
        for m in modules.values()
    }


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted; sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
    return sorted(found)


def _top(name: str) -> str:
    return name.split(".")[0]


def layering_violations(modules: Mapping[str, Module]) -> list[str]:
    out = []
    for m in modules.values():
        if m.name.endswith("__main__"):
            continue  # an entry point imports what it starts
        own = _top(m.name)
        allowed = MAY_IMPORT.get(own)
        for name in sorted(m.imports):
            top = _top(name)
            if top in FIRST_PARTY and allowed is not None and top not in allowed:
                out.append(f"{m.path.relative_to(REPO)}: {own} must not import {name} (allowed: {sorted(allowed)})")
            if top in MUST_NOT_USE.get(own, ()) and top not in FIRST_PARTY:
                out.append(f"{m.path.relative_to(REPO)}: {own} must not use {top} (imports {name})")
    return out


@pytest.fixture(scope="module")
def modules() -> dict[str, Module]:
    return read_modules(REPO)


def test_the_reader_sees_every_kind_of_import(modules: dict[str, Module]) -> None:
    """The checks below are only as good as the graph: it must contain the imports a reader would follow."""
    graph = import_graph(modules)
    assert {"cdm.compose", "registry.writer", "daemon.service", "cli", "cli.offline"} <= set(graph)
    assert "registry.reader" in graph["registry.writer"]  # module level
    assert "cdm.store" in graph["cli.offline"]  # inside a function
    assert "cdm.artifacts" in graph["sampler.loader"]  # a package's re-exported name
    assert {"cli.offline", "cli.service"} <= graph["cli"]  # ``from cli import offline, service``: submodules
    assert sum(len(v) for v in graph.values()) > 100


def test_cycle_finder() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"f"}, "f": {"e"}, "g": set()}
    assert cycles(graph) == [["a", "b", "c"], ["e", "f"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles(modules: dict[str, Module]) -> None:
    found = cycles(import_graph(modules))
    assert not found, "import cycles (each a set of modules that import each other, directly or not):\n" + "\n".join(
        " <-> ".join(c) for c in found
    )


def test_layering(modules: dict[str, Module]) -> None:
    violations = layering_violations(modules)
    assert not violations, "layering rules of PLAN.md broken:\n" + "\n".join(violations)


def test_rules_name_every_package() -> None:
    present = [p for p in PACKAGES if (REPO / p / "__init__.py").is_file()]
    assert set(present) <= set(MAY_IMPORT), f"add the layering rule of {set(present) - set(MAY_IMPORT)} here"
    assert sys.version_info >= (3, 11)
