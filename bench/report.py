"""Assemble bench/RESULTS.md from the JSON results of the last run."""

from __future__ import annotations

import json
from pathlib import Path

ORDER = [
    "quality",
    "budget",
    "forgetting",
    "slicing",
    "recipes",
    "overhead",
    "continual",
    "memorisation",
    "sampling",
    "service",
    "serving",
    "routing",
    "routing-converged",  # 8.5, a subsection of 8
]
HEADER = """# cdm benchmark results

Produced by `make bench` (`python -m bench.run --profile full`); every figure below comes from the run
described in "Environment". Ratios are computed within this one run. Regenerate with `make bench`
(`make bench-quick` for a smoke run; `--device cuda` for the GPU profile).

"""


def write(out: Path) -> Path:
    docs = {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}
    parts = [HEADER]
    summary = out.parent / "SUMMARY.md"
    if summary.exists():
        parts.append(summary.read_text() + "\n")
    first = docs.get("quality") or (next(iter(docs.values())) if docs else {})
    env = dict(first.get("environment", {}))
    prof = first.get("profile", {})
    # a benchmark re-run on its own (--only) records its own command and commit: list them all
    runs: dict[str, list[str]] = {}
    for name, d in sorted(docs.items()):
        e = d["environment"]
        runs.setdefault(f"{e.get('git_commit', '?')[:10]} {e.get('command', '?')}", []).append(name)
    if len(runs) > 1:
        env["runs"] = runs
    for name in ORDER:
        md = out / f"{name}.md"
        if md.exists():
            parts.append(md.read_text() + "\n")
    acc = out / "extractor.txt"
    if acc.exists():
        parts.append(
            f"Feature classifier (trained here, cached): Fashion-MNIST test accuracy {acc.read_text().strip()}.\n"
        )
    parts.append(
        "## Environment\n\n```\n"
        + json.dumps(env, indent=2)
        + "\n```\n\nProfile:\n\n```\n"
        + json.dumps(prof, indent=2)
        + "\n```\n"
    )
    path = out.parent / "RESULTS.md"
    path.write_text("\n".join(parts))
    return path
