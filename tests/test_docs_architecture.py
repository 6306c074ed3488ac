"""docs/architecture.md stays a true map: every path it names exists, and every package and module is named in it.

Read with plain text and ``ast`` (nothing is imported), so this runs in well under a second.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "architecture.md"
PACKAGES = ("common", "cdm", "registry", "sampler", "api", "daemon", "cli", "bench", "deploy")
SCRIPTS = ("scripts",)  # standalone scripts (no __init__.py)
TOP = (*PACKAGES, *SCRIPTS, "tests", "docs")
# a path in backticks that starts at one of the project's top-level folders: `cdm/compose.py`, `api/ui/`
_PATH = re.compile(rf"`((?:{'|'.join(TOP)})/[A-Za-z0-9_./-]*)`")


def named_paths(text: str) -> set[str]:
    return set(_PATH.findall(text))


def _defines_something(path: Path) -> bool:
    """An ``__init__.py`` that holds code of its own (a function, a class, an assignment beyond ``__all__``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            return True
        if isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(not (isinstance(t, ast.Name) and t.id in ("__all__", "__version__")) for t in targets):
                return True
    return False


def project_parts(root: Path) -> set[str]:
    """What the map must name: every package folder (``pkg/sub/``), every module except empty ``__init__.py``
    files, every standalone script, and each folder directly below ``deploy/``."""
    parts: set[str] = set()
    for package in PACKAGES:
        for init in sorted((root / package).rglob("__init__.py")):
            folder = init.parent.relative_to(root).as_posix()
            if "__pycache__" not in folder:
                parts.add(f"{folder}/")
        for module in sorted((root / package).rglob("*.py")):
            rel = module.relative_to(root).as_posix()
            if "__pycache__" in rel or (module.name == "__init__.py" and not _defines_something(module)):
                continue
            parts.add(rel)
    for scripts in SCRIPTS:
        parts.update(p.relative_to(root).as_posix() for p in sorted((root / scripts).glob("*.py")))
    parts.update(f"{d.relative_to(root).as_posix()}/" for d in sorted((root / "deploy").iterdir()) if d.is_dir())
    return {p for p in parts if "__pycache__" not in p}


def test_every_path_the_map_names_exists() -> None:
    named = named_paths(DOC.read_text(encoding="utf-8"))
    assert len(named) > 50, "the map names too few paths: is the backtick `pkg/file.py` form still used?"
    missing = sorted(p for p in named if not (REPO / p).exists() or (p.endswith("/") and not (REPO / p).is_dir()))
    assert not missing, f"docs/architecture.md names paths that do not exist: {missing}"


def test_every_package_and_module_is_on_the_map() -> None:
    named = named_paths(DOC.read_text(encoding="utf-8"))
    absent = sorted(project_parts(REPO) - named)
    assert not absent, (
        f"docs/architecture.md does not name {absent}: add a line on each one's job to the map (in backticks, as "
        "`pkg/file.py`)"
    )


def test_the_checks_see_a_new_module_and_a_stale_path(tmp_path: Path) -> None:
    for package in PACKAGES:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "scripts").mkdir()
    (tmp_path / "cdm" / "new.py").write_text("x = 1\n")
    (tmp_path / "cdm" / "sub").mkdir()
    (tmp_path / "cdm" / "sub" / "__init__.py").write_text("def build() -> None: ...\n")
    (tmp_path / "deploy" / "docker").mkdir()
    assert project_parts(tmp_path) == {
        *(f"{p}/" for p in PACKAGES),
        "cdm/new.py",
        "cdm/sub/",
        "cdm/sub/__init__.py",
        "deploy/docker/",
    }
    assert named_paths("`cdm/new.py` and `cdm/gone.py`, not cdm/bare.py or `other/x.py`") == {
        "cdm/new.py",
        "cdm/gone.py",
    }
