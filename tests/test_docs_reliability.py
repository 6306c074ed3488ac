"""docs/reliability.md stays true: every test it names exists, every dead-letter reason has a row, README links it."""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

from daemon.wire import REASONS

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "reliability.md"
TEST_REF = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")


@cache
def defined_tests(path: Path) -> frozenset[str]:
    """The module-level test functions of a test file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return frozenset(
        node.name
        for node in tree.body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test_")
    )


def test_every_test_the_reliability_page_names_exists() -> None:
    refs = TEST_REF.findall(DOC.read_text())
    assert len(refs) >= 80, f"only {len(refs)} tests named: the page lost its table?"
    missing = []
    for file, name in refs:
        path = REPO / file
        if not path.is_file() or name not in defined_tests(path):
            missing.append(f"{file}::{name}")
    assert missing == [], f"docs/reliability.md names tests that do not exist: {missing}"


def test_every_dead_letter_reason_has_a_row_with_a_test() -> None:
    rows = [line for line in DOC.read_text().splitlines() if line.startswith("|") and TEST_REF.search(line)]
    without = [r for r in REASONS if not any(f"| `{r}` |" in row for row in rows)]
    assert without == [], f"dead-letter reasons without a row (and a test) in docs/reliability.md: {without}"


def test_the_readme_links_the_reliability_page() -> None:
    assert "docs/reliability.md" in (REPO / "README.md").read_text()
