"""Run the benchmarks: ``python -m bench.run --profile quick|full|gpu|routing [--only quality,...,routing]``.

Each benchmark prints its figures and writes JSON + Markdown to bench/results/; the report step assembles
bench/RESULTS.md from them (ratios are from one run, next to absolute times).

Groups (--only, comma-separated): quality (sections 1-4), slicing (2b), overhead (2c), sampling (5), service (6),
serving (7), routing (8: router kinds at equal compute), and, only when named, routing-converged (8.5: the router
kinds at K x compute, each compartment converged_steps x B; it reads routing.json from --out for the
equal-compute numbers it sets side by side, so run `--only routing` with the same profile first).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

from bench import report
from bench.common import PROFILES, RESULTS, environment

DEFAULT_GROUPS = ("quality", "slicing", "overhead", "sampling", "service", "serving", "routing")
GROUPS = (*DEFAULT_GROUPS, "routing-converged")  # routing-converged runs only when named


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
        help=f"comma-separated benchmark groups of {', '.join(GROUPS)} (default: all but routing-converged)",
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
    if only & {"quality", "slicing"}:
        from cdm.metrics import get_feature_extractor

        t = time.perf_counter()
        ext = get_feature_extractor(p.sample_size, cache_dir=Path(".cache/cdm"), device=p.device, progress=False)
        print(f"feature classifier: test accuracy {ext.test_accuracy:.4f} ({time.perf_counter() - t:.0f}s)")
        (out / "extractor.txt").write_text(f"{ext.test_accuracy:.4f}\n")
    if "quality" in only:
        from bench import quality

        assert ext is not None
        for res in quality.run(p, out, ext):  # each result carries its own wall time
            res.write(out, env)
    if "slicing" in only:
        from bench import slicing

        assert ext is not None
        t = time.perf_counter()
        res = slicing.run(p, out, ext)
        res.seconds = time.perf_counter() - t
        res.write(out, env)
    if "overhead" in only:
        from bench import overhead

        t = time.perf_counter()
        res = overhead.run(p, out)
        res.seconds = time.perf_counter() - t
        res.write(out, env)
    if "sampling" in only:
        from bench import sampling

        t = time.perf_counter()
        res = sampling.run(p, out)
        res.seconds = time.perf_counter() - t
        res.write(out, env)
    if "routing" in only:
        from bench import routing
        from cdm.metrics import get_feature_extractor

        ext = get_feature_extractor(p.sample_size, cache_dir=Path(".cache/cdm"), device=p.device, progress=False)
        routing.run(p, out, ext, env)
    if "routing-converged" in only:  # after routing: it reads routing.json's equal-compute rows
        from bench import routing_converged
        from cdm.metrics import get_feature_extractor

        ext = get_feature_extractor(p.sample_size, cache_dir=Path(".cache/cdm"), device=p.device, progress=False)
        routing_converged.run(p, out, ext, env)
    if "service" in only:
        from bench import service

        t = time.perf_counter()
        res = service.run(p, out)
        res.seconds = time.perf_counter() - t
        res.write(out, env)
    if "serving" in only:
        from bench import serving

        t = time.perf_counter()
        res = serving.run(p, out)
        res.seconds = time.perf_counter() - t
        res.write(out, env)
    path = report.write(out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
