"""Run the benchmarks: ``python -m bench.run --profile quick|full|gpu|routing [--only quality,...,routing]``.

Each benchmark prints its figures and writes JSON + Markdown to bench/results/; the report step assembles
bench/RESULTS.md from them (ratios are from one run, next to absolute times).

Groups (--only, comma-separated): quality (sections 1-4), slicing (2b), overhead (2c), sampling (5), service (6),
serving (7), routing (8: router kinds at equal compute), and, only when named, recipes (2d: forget-samples under
equal-FLOP compartment recipes against retraining the monolith) and routing-converged (8.5: the router
kinds at K x compute, each compartment converged_steps x B; it reads routing.json from --out for the
equal-compute numbers it sets side by side, so run `--only routing` with the same profile first).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from bench import report
from bench.common import PROFILES, RESULTS, Profile, environment

if TYPE_CHECKING:
    from cdm.metrics import FeatureExtractor

DEFAULT_GROUPS = ("quality", "slicing", "overhead", "sampling", "service", "serving", "routing")
GROUPS = (*DEFAULT_GROUPS, "recipes", "routing-converged")  # these two run only when named
# groups that score samples with the cached feature classifier (the others time or count)
SCORED = {"quality", "slicing", "recipes", "routing", "routing-converged"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--profile",
        choices=sorted(PROFILES),
        default=None,
        help="sizes of the run (default: quick on cpu, gpu with --device cuda)",
    )
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None, help="override the profile's device")
    ap.add_argument(
        "--only",
        default=",".join(DEFAULT_GROUPS),
        help=f"comma-separated benchmark groups of {', '.join(GROUPS)} (default: all but recipes and "
        "routing-converged)",
    )
    ap.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (overrides the profile's; 1 on a shared CPU)"
    )
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    only = set(args.only.split(","))
    unknown = sorted(only - set(GROUPS))
    if unknown:
        print(f"--only: unknown group(s) {', '.join(unknown)}; choose from {', '.join(GROUPS)}", file=sys.stderr)
        return 2
    p = PROFILES[args.profile or ("gpu" if args.device == "cuda" else "quick")]
    if args.device:
        p = dataclasses.replace(p, device=args.device)
    if args.threads is not None:
        p = dataclasses.replace(p, threads=args.threads)
    if p.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    torch.manual_seed(p.seed)
    if p.threads:
        torch.set_num_threads(p.threads)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    env = environment()
    print(f"profile {p.name} on {p.device}: {p}", flush=True)
    ext = None
    if only & SCORED:
        from cdm.metrics import get_feature_extractor

        t = time.perf_counter()
        ext = get_feature_extractor(p.sample_size, cache_dir=Path(".cache/cdm"), device=p.device, progress=False)
        print(f"feature classifier: test accuracy {ext.test_accuracy:.4f} ({time.perf_counter() - t:.0f}s)")
        (out / "extractor.txt").write_text(f"{ext.test_accuracy:.4f}\n")
    for group in GROUPS:  # in this order: routing-converged reads routing.json's equal-compute rows
        if group in only:
            run_group(group, p, out, ext, env)
    path = report.write(out)
    print(f"wrote {path}")
    return 0


def run_group(group: str, p: Profile, out: Path, ext: FeatureExtractor | None, env: dict[str, Any]) -> None:
    """Run one group and write its results (each result with its wall time; routing groups write their own)."""
    if group in SCORED:
        assert ext is not None
    if group == "quality":
        from bench import quality

        assert ext is not None
        for res in quality.run(p, out, ext):  # each result carries its own wall time
            res.write(out, env)
        return
    if group in ("routing", "routing-converged"):
        from bench import routing, routing_converged

        assert ext is not None
        (routing if group == "routing" else routing_converged).run(p, out, ext, env)
        return
    t = time.perf_counter()
    if group in ("slicing", "recipes"):
        from bench import slicing

        assert ext is not None
        res = slicing.run(p, out, ext) if group == "slicing" else slicing.recipes(p, out, ext)
    else:
        import importlib

        res = importlib.import_module(f"bench.{group}").run(p, out)  # overhead, sampling, service, serving
    res.seconds = time.perf_counter() - t
    res.write(out, env)


if __name__ == "__main__":
    sys.exit(main())
