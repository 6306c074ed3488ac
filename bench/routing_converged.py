"""8.5 Router kinds at K x compute (issue 12): section 8.1's comparison at the profile's "converged" budget.

Section 8.1 (bench/routing.py) compares the router kinds at equal compute: each of the K compartments trains
``p.steps`` steps at B / K. Here each compartment trains ``p.converged_steps`` steps at the monolith's full batch B
(K x the monolith's compute; ``bench.quality`` section 1 measures the learnt kind alone at this budget), for every
split of ``p.converged_splits``. The learnt router is trained on each split (it depends on the data only, not on the
compartments), and so are the heads (``bench.routing.heads_for``: trained once per source, reused from 8.1 when both
groups run in one process). The rows are 8.1's, made by the same code (``bench.routing.monolith_row`` /
``kind_rows``): learnt full and top-1, density full and pruned, heads full and top-1, the same stochastic sampler
and seed, FID / KID against the same test features, the monolith at ``p.steps`` x B as the reference, attribution
agreement on the by-class split. The facts put each ratio next to 8.1's equal-compute one, read from
``routing.json`` in the same results folder.

Run: ``python -m bench.run --profile routing --only routing-converged`` (``make bench-routing-converged``).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import REPO, Profile, Result
from bench.quality import SPLITS, Bench, split_parts, train_parts
from bench.routing import QUALITY_COLUMNS, QUALITY_NOTES, kind_rows, monolith_row, prune_label
from cdm.compose import ComposedDenoiser
from cdm.metrics import FeatureExtractor
from cdm.routing import PruneConfig

NAME = "routing-converged"
# the profile fields that make 8.1's rows: an equal-compute routing.json is comparable only if they all match
EQUAL_COMPUTE_FIELDS = (
    "device",
    "sample_size",
    "channels",
    "batch",
    "steps",
    "k",
    "router_steps",
    "router_batch",
    "n_fid",
    "sample_steps",
    "train_limit",
    "seed",
    "routing_scheduler",
    "prune",
)

Key = tuple[str, str, str]  # (split, kind, routing)


@dataclass
class EqualCompute:
    """8.1's equal-compute numbers from a routing.json: FID / monolith and attribution agreement (snr weighting)
    per (split, kind, routing), the monolith's FID there, and where they came from (or why there are none)."""

    source: str
    ratios: dict[Key, float] = field(default_factory=dict)
    agreement: dict[Key, float] = field(default_factory=dict)
    mono_fid: float | None = None


def shown(path: Path) -> str:
    """``path`` relative to the repository when it is inside it."""
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def equal_compute(path: Path, p: Profile) -> EqualCompute:
    """Section 8.1's rows of the routing.json at ``path``; none (and the reason in ``source``) when the file is
    absent, has no 8.1 section, or was run with other 8.1 settings than ``p``."""
    where = shown(path)
    if not path.is_file():
        return EqualCompute(f"none: {where} is absent (run `--only routing` with profile {p.name} first)")
    doc = json.loads(path.read_text())
    ours = json.loads(json.dumps(p.to_dict()))  # tuples as JSON lists, like the file's
    theirs = doc.get("profile", {})
    differ = [k for k in EQUAL_COMPUTE_FIELDS if theirs.get(k) != ours[k]]
    if differ:
        got = ", ".join(f"{k} {theirs.get(k)!r} there vs {ours[k]!r} here" for k in differ)
        return EqualCompute(f"none: {where} was run with other 8.1 settings ({got})")
    section = next((s for s in doc.get("sections", []) if s.get("name") == "routing-quality"), None)
    if section is None:
        return EqualCompute(f"none: {where} has no 8.1 section (routing-quality)")
    col = {c: i for i, c in enumerate(section["columns"])}
    env = doc.get("environment", {})
    eq = EqualCompute(
        f"{where}, section 8.1 (profile {theirs.get('name')}, commit {str(env.get('git_commit', '?'))[:10]}, "
        f"{env.get('date', '?')})"
    )
    for row in section["rows"]:
        key = (row[col["split"]], row[col["kind"]], row[col["routing"]])
        if key[1] == "monolith":
            eq.mono_fid = float(row[col["FID"]])
            continue
        eq.ratios[key] = float(row[col["FID / monolith"]])
        agree = str(row[col["attribution agreement: mean / alpha_bar / snr"]])
        if agree != "n/a":
            eq.agreement[key] = float(agree.split("/")[-1])
    return eq


def side_by_side(
    split: str, routings: list[tuple[str, str]], here: dict[Key, float], there: dict[Key, float], *, digits: int
) -> str:
    """One fact line: each kind's number at K x compute, the equal-compute one in brackets ("-" when absent)."""
    parts = []
    for kind, routing in routings:
        key = (split, kind, routing)
        before = f"{there[key]:.{digits}f}" if key in there else "-"
        parts.append(f"{kind} {routing} {here[key]:.{digits}f} ({before})")
    return ", ".join(parts)


def budget_label(p: Profile) -> str:
    """The honest name of this budget: K x compute, the profile's 'converged' one, not a run to convergence."""
    where = f" on {os.cpu_count()} CPU cores" if p.device == "cpu" else ""
    return (
        f"K x compute (each compartment {p.converged_steps} steps x B = {p.batch}; the profile's 'converged' "
        f"budget, not trained to convergence{where})"
    )


def run(p: Profile, out: Path, ext: FeatureExtractor, env: dict[str, Any]) -> Result:
    """The monolith, then per split: K compartments at ``converged_steps`` x B, the learnt router, 8.1's rows.
    ``routing-converged.json`` / ``.md`` are rewritten after each split (a late failure keeps the rest)."""
    splits = [s for s in SPLITS if s in p.converged_splits]
    if not splits:
        raise ValueError(
            f"profile {p.name} has converged_splits {p.converged_splits!r}: name at least one of {SPLITS} "
            "for the routing-converged group"
        )
    started = time.perf_counter()
    eq = equal_compute(out / "routing.json", p)  # read before anything is written to out
    b = Bench(p, out, ext)
    r = Result(
        NAME,
        f"8.5 Quality per router kind at {budget_label(p)}: FID on {p.n_fid} samples, attribution agreement "
        "(by-class split)",
        p,
        list(QUALITY_COLUMNS),
        level=4,
    )
    _, _, mono_fid = monolith_row(p, b, r)
    scores: dict[Key, float] = {}
    routings = [("learnt", "full"), ("learnt", "top-1"), ("density", "full")]
    routings += [("density", prune_label(PruneConfig(threshold=t, patience=k))) for t, k in p.prune]
    routings += [("heads", "full"), ("heads", "top-1")]
    r.facts["budget"] = (
        f"{p.k} compartments x {p.converged_steps} steps x B = {p.batch} = {p.k * p.converged_steps / p.steps:g}x "
        f"the monolith's {p.steps} x {p.batch}; the learnt router {p.router_steps} x {p.router_batch} per split and "
        "each source's head the same, as in 8.1"
    )
    r.facts["equal-compute numbers (in brackets)"] = eq.source
    r.facts["feature extractor"] = (
        f"test accuracy {ext.test_accuracy:.4f}, weights sha256 {str(ext.meta.get('weights_sha256', '?'))[:16]} "
        "(FIDs compare across runs only with the same extractor weights)"
    )
    if eq.mono_fid is not None:
        r.facts["monolith FID"] = (
            f"{mono_fid:.1f} here, {eq.mono_fid:.1f} in the equal-compute run (same recipe and seed; each ratio is "
            "to its own run's monolith)"
        )
    for split in splits:
        t = time.perf_counter()
        parts = split_parts(b, split)
        comps, train_s = train_parts(b, parts, p.batch, p.converged_steps)
        router, router_s = b.router(parts)
        learnt = ComposedDenoiser(comps, router, list(parts))
        kind_rows(p, b, r, split, parts, comps, learnt, train_s, router_s, mono_fid, scores)
        ratios = {key: f / mono_fid for key, f in scores.items() if not key[2].endswith(":agreement")}
        r.facts[f"FID / monolith, {split} (equal compute in brackets)"] = side_by_side(
            split, routings, ratios, eq.ratios, digits=2
        )
        if split == "by-class":
            agreement: dict[Key, float] = {
                (s, k, m.removesuffix(":agreement")): v
                for (s, k, m), v in scores.items()
                if s == split and m.endswith(":agreement")
            }
            r.facts["attribution agreement, by-class, snr weighting (equal compute in brackets)"] = side_by_side(
                split, routings, agreement, eq.agreement, digits=3
            )
        r.seconds = time.perf_counter() - started
        r.notes = [
            *QUALITY_NOTES,
            "the learnt router is trained on each split's data in memory (bench.quality's Bench.router); it depends "
            "on the data only, so it is the same recipe as 8.1's (whose random-split router went through the "
            "store's lifecycle); so do the heads (trained once per source and process, reused across budgets).",
            "the reference is 8.1's: the monolith at the profile's steps x B, retrained in this run with the same "
            "recipe and seed; the compartments here get the same batch B for converged_steps steps each.",
        ]
        r.write(out, env)
        print(f"routing-converged: {split} done in {time.perf_counter() - t:.0f}s", flush=True)
    return r
