"""5. Sampling cost vs the number of compartments: seconds per image and peak memory, loop vs vmap vs top-1.

Each configuration runs in a fresh subprocess so its peak RSS is its own. Compartments are randomly initialised:
cost does not depend on the weights.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import REPO, Profile, Result, UniformRouter

REPEATS = 3  # timed runs per configuration; the median is reported


def measure(
    k: int,
    mode: str,
    n: int,
    steps: int,
    sample_size: int,
    channels: tuple[int, ...],
    device: str,
    repeats: int = REPEATS,
) -> dict:
    from cdm.compartment import Compartment, build_unet, new_manifest
    from cdm.compose import ComposedDenoiser, Vectorize
    from cdm.config import ModelConfig, TrainConfig
    from cdm.pipeline import CompartmentalPipeline, make_scheduler
    from cdm.routing import Router

    torch.manual_seed(0)
    model = ModelConfig(sample_size=sample_size, block_out_channels=channels)
    names = [f"s{i}" for i in range(k)]
    comps = [
        Compartment(
            build_unet(model, 10).eval(),
            new_manifest(
                n_, fingerprint="-", n_samples=1, class_counts=[], num_classes=10, model=model, train=TrainConfig()
            ),
        )
        for n_ in names
    ]
    # "single": one bare model (no router), the baseline every composed configuration is compared with
    router = (
        UniformRouter(names)
        if mode == "single"
        else Router(source_names=names, sample_size=sample_size, num_classes=10)
    )
    vectorize: Vectorize = "vmap" if mode == "full-vmap" else "loop"
    den = ComposedDenoiser(comps, router, names, vectorize=vectorize).to(device)
    pipe = CompartmentalPipeline(den, make_scheduler("dpm", model))
    top_k = 1 if mode == "top-1" else None
    kw: dict[str, Any] = dict(batch_size=n, top_k=top_k, num_inference_steps=steps, progress=False)
    pipe(**{**kw, "num_inference_steps": 2})  # warm-up at the timed batch size (allocator, thread pool)
    base = _rss_kb("VmRSS")
    reset = _reset_peak()
    times = []
    for r in range(repeats):  # the median of a few runs: one 2-second run is at the mercy of the machine
        t = time.perf_counter()
        with torch.no_grad():
            pipe(generator=torch.Generator().manual_seed(r), **kw)
        times.append(time.perf_counter() - t)
    secs = float(np.median(times))
    peak = _rss_kb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "k": k,
        "mode": mode,
        "s_per_image": secs / n,
        "repeats": repeats,
        "peak_rss_mb": peak / 1024,
        "sampling_mb": (peak - base) / 1024,
    }


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) so the peak covers sampling only (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def run(p: Profile, out: Path) -> Result:
    r = Result(
        "sampling",
        f"5. Sampling cost ({p.sampling_batch} images, {p.sample_steps} DPM-Solver++ steps, "
        f"{p.sample_size}x{p.sample_size}, device {p.device}; median of {REPEATS} runs; 'single' is one bare model, "
        "no router)",
        p,
        ["K", "mode", "s / image", "x single model", "overhead beyond K x", "peak RSS MB", "MB above idle"],
    )
    rows = []
    configs = [(1, "single")] + [(k, m) for k in p.sampling_ks if k > 1 for m in ("full-loop", "full-vmap", "top-1")]
    for k, mode in configs:
        cmd = [
            sys.executable,
            "-m",
            "bench.sampling",
            "--k",
            str(k),
            "--mode",
            mode,
            "--n",
            str(p.sampling_batch),
            "--steps",
            str(p.sample_steps),
            "--size",
            str(p.sample_size),
            "--channels",
            ",".join(map(str, p.channels)),
            "--device",
            p.device,
        ]
        res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True)
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    single = rows[0]["s_per_image"]
    for row in rows:
        ratio = row["s_per_image"] / single
        overhead = ratio / row["k"] - 1 if row["mode"].startswith("full") else float("nan")
        r.add(row["k"], row["mode"], row["s_per_image"], ratio, overhead, row["peak_rss_mb"], row["sampling_mb"])
    biggest = max(p.sampling_ks)
    top1 = next(x for x in rows if x["k"] == biggest and x["mode"] == "top-1")["s_per_image"] / single
    loop = next(x for x in rows if x["k"] == biggest and x["mode"] == "full-loop")["s_per_image"] / single
    vmap = next(x for x in rows if x["k"] == biggest and x["mode"] == "full-vmap")["s_per_image"] / single
    r.facts[f"{biggest}-compartment top-1 vs one model"] = (
        f"{top1:.2f}x (target <= 1.3x: {'met' if top1 <= 1.3 else 'missed'})"
    )
    best_full = min(loop, vmap)
    r.facts[f"{biggest}-compartment full mixture overhead beyond {biggest}x"] = (
        f"{best_full / biggest - 1:+.1%} with the faster of loop/vmap (target <= +10%: "
        f"{'met' if best_full / biggest - 1 <= 0.10 else 'missed'})"
    )
    r.facts[f"vmap vs loop at K={biggest}"] = f"vmap takes {vmap / loop:.2f}x the loop's time on {p.device}"
    r.plots.append(str(_plot(out, rows)))
    return r


def _plot(out: Path, rows: list[dict]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    single = rows[0]["s_per_image"]
    for mode in ("full-loop", "full-vmap", "top-1"):
        pts = [(1, single)] + [(x["k"], x["s_per_image"]) for x in rows if x["mode"] == mode]
        ax.plot([k for k, _ in pts], [s for _, s in pts], "o-", label=mode)
    ax.set_xlabel("compartments K")
    ax.set_ylabel("seconds per image")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "sampling_cost.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    a = argparse.ArgumentParser()
    a.add_argument("--k", type=int)
    a.add_argument("--mode")
    a.add_argument("--n", type=int)
    a.add_argument("--steps", type=int)
    a.add_argument("--size", type=int)
    a.add_argument("--channels")
    a.add_argument("--device", default="cpu")
    ns = a.parse_args()
    print(
        json.dumps(
            measure(ns.k, ns.mode, ns.n, ns.steps, ns.size, tuple(int(c) for c in ns.channels.split(",")), ns.device)
        )
    )
