"""bench's routing-converged group (section 8.5): reading 8.1's equal-compute rows, the side-by-side facts, its
place in RESULTS.md and its --only name. The group's training and sampling run in the benchmark itself."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from bench import report, run
from bench.common import PROFILES, Result
from bench.routing import QUALITY_COLUMNS
from bench.routing_converged import EqualCompute, budget_label, equal_compute, side_by_side

P = PROFILES["routing"]
PRUNED = "pruned (w < 0.01 for 3 steps)"


def _routing_json(path: Path, profile: dict[str, Any]) -> None:
    """A routing.json as bench/routing.py writes it: 8.1's rows (monolith, two kinds on two splits) and 8.2."""
    rows = [
        ["all data", "monolith", "-", 300.0, 70.0, 1.0, 1.0, 4.0, 20.0, "-"],
        ["random", "learnt", "full", 360.0, 80.0, 1.2, 8.0, 30.0, 50.0, "n/a"],
        ["random", "density", PRUNED, 330.0, 80.0, 1.1, 4.0, 20.0, 40.0, "n/a"],
        ["by-class", "learnt", "top-1", 270.0, 60.0, 0.9, 1.0, 5.0, 60.0, "0.350 / 0.340 / 0.333"],
    ]
    doc = {
        "name": "routing",
        "profile": profile,
        "environment": {"git_commit": "0123456789abcdef", "date": "2026-01-02 03:04:05 UTC"},
        "sections": [
            {"name": "routing-quality", "columns": list(QUALITY_COLUMNS), "rows": rows},
            {"name": "routing-cost", "columns": ["K"], "rows": [[1]]},
        ],
    }
    path.write_text(json.dumps(doc))


def test_equal_compute_reads_8_1_rows_of_the_same_settings(tmp_path: Path) -> None:
    path = tmp_path / "routing.json"
    _routing_json(path, json.loads(json.dumps(P.to_dict())))
    eq = equal_compute(path, P)
    assert eq.ratios == {
        ("random", "learnt", "full"): 1.2,
        ("random", "density", PRUNED): 1.1,
        ("by-class", "learnt", "top-1"): 0.9,
    }
    assert eq.agreement == {("by-class", "learnt", "top-1"): 0.333}
    assert eq.mono_fid == 300.0
    assert "section 8.1" in eq.source and "0123456789" in eq.source and "2026-01-02" in eq.source


def test_equal_compute_ignores_the_converged_budget_but_not_8_1_settings(tmp_path: Path) -> None:
    path = tmp_path / "routing.json"
    other_converged = dataclasses.replace(P, converged_steps=P.converged_steps * 2)  # not one of 8.1's settings
    _routing_json(path, json.loads(json.dumps(other_converged.to_dict())))
    assert equal_compute(path, P).ratios
    _routing_json(path, json.loads(json.dumps(dataclasses.replace(P, steps=P.steps + 1, n_fid=7).to_dict())))
    eq = equal_compute(path, P)
    assert not eq.ratios and eq.mono_fid is None
    assert eq.source.startswith("none:") and "steps 161 there vs 160 here" in eq.source and "n_fid" in eq.source


def test_equal_compute_says_why_there_are_none(tmp_path: Path) -> None:
    absent = equal_compute(tmp_path / "routing.json", P)
    assert absent.source.startswith("none:") and "absent" in absent.source and not absent.ratios
    path = tmp_path / "routing.json"
    path.write_text(json.dumps({"profile": json.loads(json.dumps(P.to_dict())), "sections": []}))
    assert "no 8.1 section" in equal_compute(path, P).source


def test_side_by_side_puts_the_equal_compute_number_in_brackets() -> None:
    here = {("random", "learnt", "full"): 0.934, ("random", "density", "full"): 0.9}
    there = EqualCompute("x", ratios={("random", "learnt", "full"): 1.22}).ratios
    line = side_by_side("random", [("learnt", "full"), ("density", "full")], here, there, digits=2)
    assert line == "learnt full 0.93 (1.22), density full 0.90 (-)"


def test_budget_label_is_k_x_compute_not_convergence() -> None:
    label = budget_label(P)
    assert label.startswith("K x compute") and f"{P.converged_steps} steps x B = {P.batch}" in label
    assert "not trained to convergence" in label


def test_report_puts_8_5_right_after_section_8(tmp_path: Path) -> None:
    out = tmp_path / "results"
    env = {"git_commit": "abc", "command": "python -m bench.run"}
    for name, title, level in (
        ("routing-converged", "8.5 at K x compute", 4),
        ("routing", "8. Router kinds", 3),
        ("serving", "7. Serving", 3),
    ):
        Result(name, title, P, ["a"], rows=[[1]], level=level).write(out, env)
    text = report.write(out).read_text()
    assert text.index("### 7. Serving") < text.index("### 8. Router kinds") < text.index("#### 8.5 at K x compute")
    assert "\n#### 8.5" in text and "\n### 8.5" not in text


def test_only_names_the_group_and_rejects_unknown_ones(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert "routing-converged" in run.GROUPS and "routing-converged" not in run.DEFAULT_GROUPS
    out = tmp_path / "out"
    assert run.main(["--only", "routing-converged,routng", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "routng" in err and "routing-converged" in err
    assert not out.exists()
