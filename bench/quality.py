"""Quality (CDM vs monolith, two budgets), forgetting, continual learning and memorisation, sharing trained models."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from bench.common import (
    Profile,
    Result,
    UniformRouter,
    generate,
    router_step_flops,
    timer,
    unet_step_flops,
)
from cdm.compartment import Compartment, build_unet, new_manifest
from cdm.compose import ComposedDenoiser
from cdm.config import ModelConfig, RouterConfig, TrainConfig
from cdm.data import Scheme, SourceData, concat, from_model_tensor, load_fashion_mnist, split_sources, to_model_tensor
from cdm.metrics import FeatureExtractor, fid, kid, memorisation
from cdm.routing import train_router
from cdm.training import train_compartment
from cdm.viz import save_grid


class Bench:
    """Trains what the benchmarks need once and scores samples against the Fashion-MNIST test split."""

    def __init__(self, p: Profile, out: Path, extractor: FeatureExtractor) -> None:
        self.p = p
        self.out = out
        self.model = ModelConfig(sample_size=p.sample_size, block_out_channels=p.channels)
        self.ext = extractor
        train = load_fashion_mnist("train")
        self.data = train.subset(slice(0, p.train_limit)) if p.train_limit else train
        ref = load_fashion_mnist("test")
        self.ref_feats = extractor.features(from_model_tensor(to_model_tensor(ref.images, p.sample_size)))
        self.router_cfg = RouterConfig(steps=p.router_steps, batch_size=p.router_batch, device=p.device, seed=p.seed)

    def train_cfg(self, batch: int, steps: int) -> TrainConfig:
        precision: Literal["fp32", "bf16"] = "bf16" if self.p.device == "cuda" else "fp32"
        return TrainConfig(
            steps=steps,
            batch_size=batch,
            warmup_steps=min(50, steps // 10),
            checkpoint_every=0,
            device=self.p.device,
            precision=precision,
            seed=self.p.seed,
        )

    def train(self, name: str, data: SourceData, batch: int, steps: int) -> tuple[Compartment, float]:
        res = train_compartment(
            name, data, model=self.model, train=self.train_cfg(batch, steps), num_classes=10, progress=False
        )
        assert res.compartment is not None
        return res.compartment.to(self.p.device), res.seconds

    def router(self, parts: dict[str, SourceData]) -> tuple[Any, float]:
        with timer() as t:
            rr = train_router(parts, model=self.model, router=self.router_cfg, num_classes=10, progress=False)
        return rr.router.to(self.p.device), t["s"]

    def score(
        self,
        den: ComposedDenoiser,
        *,
        top_k: int | None = None,
        grid: str | None = None,
        sources: list[str] | None = None,
    ) -> dict[str, float]:
        """FID/KID of n_fid unconditional samples; optionally a PNG grid of the first 40."""
        with timer() as t:
            imgs, att = generate(
                den, self.model, self.p.n_fid, steps=self.p.sample_steps, seed=self.p.seed, top_k=top_k, sources=sources
            )
        feats = self.ext.features(imgs)
        k_mean, _ = kid(feats, self.ref_feats, subset_size=min(500, len(feats)))
        if grid:
            save_grid(
                imgs[:40],
                self.out / f"grid-{grid}.png",
                nrow=10,
                scale=2,
                attribution=att[:40],
                source_names=den.source_names,
            )
        return {"fid": fid(feats, self.ref_feats), "kid": k_mean, "sample_s": t["s"]}


SPLITS: tuple[Scheme, ...] = ("random", "by-class")  # the IID and the class-disjoint split


def single(comp: Compartment, name: str) -> ComposedDenoiser:
    return ComposedDenoiser([comp], UniformRouter([name]), [name])


def split_parts(b: Bench, split: Scheme) -> dict[str, SourceData]:
    """The profile's K sources of ``split``, named by split and index (``rand0``, ``by-c3``)."""
    return {f"{split[:4]}{i}": d for i, d in enumerate(split_sources(b.data, split, b.p.k, seed=b.p.seed))}


def train_parts(b: Bench, parts: dict[str, SourceData], batch: int, steps: int) -> tuple[list[Compartment], float]:
    """One compartment per source (``steps`` x ``batch`` each) and their total training seconds."""
    comps, secs = [], 0.0
    for n, d in parts.items():
        c, train_s = b.train(n, d, batch, steps)
        comps.append(c)
        secs += train_s
    return comps, secs


def run(p: Profile, out: Path, ext: FeatureExtractor) -> list[Result]:
    started = time.perf_counter()
    b = Bench(p, out, ext)
    quality = Result(
        "quality",
        f"1. Quality: {p.k}-source CDM vs the monolithic model (FID/KID on "
        f"{p.n_fid} samples vs the Fashion-MNIST test split, {p.sample_size}x{p.sample_size})",
        p,
        ["split", "budget", "routing", "FID", "KID", "FID / monolith", "train s", "sample s"],
    )
    budget = Result("budget", "FID vs training budget (monolith)", p, ["steps", "batch", "FID", "train s"])
    # 0. references: untrained model and the monolith at three budgets
    untrained = Compartment(
        build_unet(b.model, 10).eval(),
        new_manifest(
            "untrained",
            fingerprint="-",
            n_samples=0,
            class_counts=[],
            num_classes=10,
            model=b.model,
            train=b.train_cfg(p.batch, 0),
        ),
    ).to(p.device)
    s_untrained = b.score(single(untrained, "untrained"))
    quality.add(
        "-",
        "none",
        "untrained model",
        s_untrained["fid"],
        s_untrained["kid"],
        float("nan"),
        0.0,
        s_untrained["sample_s"],
    )
    mono = None
    mono_s = 0.0
    budget_rows = []
    for frac in (0.25, 0.5, 1.0):
        steps = max(1, int(p.steps * frac))
        comp, secs = b.train(f"mono-{steps}", b.data, p.batch, steps)
        s = b.score(single(comp, "monolith"), grid="monolith" if frac == 1.0 else None)
        budget.add(steps, p.batch, s["fid"], secs)
        budget_rows.append((steps, s["fid"]))
        if frac == 1.0:
            mono, mono_s, mono_score = comp, secs, s
    assert mono is not None
    quality.add(
        "all data",
        f"{p.steps} steps x B={p.batch}",
        "monolith",
        mono_score["fid"],
        mono_score["kid"],
        1.0,
        mono_s,
        mono_score["sample_s"],
    )
    shared: dict[str, Any] = {"mono": mono, "mono_s": mono_s, "mono_fid": mono_score["fid"], "bench": b}
    best_ratio: dict[str, float] = {}
    # 1. CDM per split, equal compute (DDM recipe) and converged
    for split in SPLITS:
        parts = split_parts(b, split)
        names = list(parts)
        budgets = [("equal compute", max(1, p.batch // p.k), p.steps)]
        if split in p.converged_splits:
            budgets.append(("converged", p.batch, p.converged_steps))
        router, router_s = b.router(parts)
        for label, batch, steps in budgets:
            comps, secs = train_parts(b, parts, batch, steps)
            den = ComposedDenoiser(comps, router, names)
            tag = f"{split}-{label.replace(' ', '-')}"
            for routing, k in (("full", None), ("top-1", 1), ("top-2", 2)):
                s = b.score(den, top_k=k, grid=f"{tag}-{routing}" if routing != "top-2" else None)
                ratio = s["fid"] / mono_score["fid"]
                if label == "equal compute":
                    best_ratio[split] = min(best_ratio.get(split, 9e9), ratio)
                    if routing == "top-1":
                        shared[f"{split}-top1-fid"] = s["fid"]
                quality.add(
                    split,
                    f"{label}: {steps} steps x B={batch} each",
                    routing,
                    s["fid"],
                    s["kid"],
                    ratio,
                    secs + router_s,
                    s["sample_s"],
                )
            if label == "equal compute":
                s = b.score(ComposedDenoiser(comps, UniformRouter(names), names), grid=f"{tag}-uniform")
                quality.add(
                    split,
                    f"{label}: {steps} steps x B={batch} each",
                    "uniform average (no router)",
                    s["fid"],
                    s["kid"],
                    s["fid"] / mono_score["fid"],
                    secs,
                    s["sample_s"],
                )
                shared[split] = {
                    "parts": parts,
                    "comps": comps,
                    "router": router,
                    "router_s": router_s,
                    "train_s": secs,
                    "batch": batch,
                    "steps": steps,
                }
                if split == "by-class":
                    shared["trajectory_den"] = den
    for name, r in best_ratio.items():
        verdict = "met" if r <= 1.10 else "missed"
        quality.facts[f"best equal-compute FID ratio, {name}"] = f"{r:.3f} (target <= 1.10: {verdict})"
    quality.plots.append(str(_plot_budget(out, budget_rows, quality)))
    quality.plots.append(str(_plot_trajectory(out, shared["trajectory_den"], b)))
    quality.seconds = time.perf_counter() - started
    budget.seconds = sum(r[3] for r in budget.rows)
    results = [quality, budget]
    for bench in (lambda: forgetting(p, b, shared), lambda: continual(p, b, shared), lambda: memorisation_bench(p, b)):
        t = time.perf_counter()
        res = bench()
        res.seconds = time.perf_counter() - t
        results.append(res)
    return results


def forgetting(p: Profile, b: Bench, shared: dict[str, Any]) -> Result:
    r = Result(
        "forgetting",
        "2. Forgetting: CDM (random split, equal compute) vs retraining the monolith",
        p,
        [
            "request",
            "method",
            "seconds",
            "speed-up (wall)",
            "train TFLOP",
            "speed-up (FLOPs)",
            "FID before",
            "FID after",
            "FID change",
        ],
    )
    sh = shared["random"]
    parts: dict[str, SourceData] = sh["parts"]
    names = list(parts)
    before = shared["random-top1-fid"]  # scored in the quality benchmark with the same seed
    victim = names[0]
    # a) a whole source: drop its compartment, retrain the router on the others
    rest = {n: d for n, d in parts.items() if n != victim}
    router2, router_s = b.router(rest)
    den2 = ComposedDenoiser([c for n, c in zip(names, sh["comps"], strict=True) if n != victim], router2, list(rest))
    after_src = b.score(den2, top_k=1)["fid"]
    # b) 1% of one source: retrain that compartment + the router
    d = parts[victim]
    rng = np.random.default_rng(p.seed)
    drop = rng.choice(len(d), size=max(1, len(d) // 100), replace=False)
    keep = np.setdiff1d(np.arange(len(d)), drop)
    kept = d.subset(keep)
    comp_new, comp_s = b.train(victim, kept, sh["batch"], sh["steps"])
    parts_b = dict(parts, **{victim: kept})
    router3, router3_s = b.router(parts_b)
    comps_b = [comp_new if n == victim else c for n, c in zip(names, sh["comps"], strict=True)]
    after_samples = b.score(ComposedDenoiser(comps_b, router3, names), top_k=1)["fid"]
    # c) the monolith must retrain on everything minus those samples
    all_minus = concat([parts_b[n] for n in names])
    mono_new, mono_s = b.train("mono-forget", all_minus, p.batch, p.steps)
    mono_after = b.score(single(mono_new, "monolith"))["fid"]
    mono_before = shared["mono_fid"]
    t_src, t_samples = router_s, comp_s + router3_s
    # the same budgets in FLOPs (forward + backward per step x steps), which a saturated accelerator approaches
    fl_comp = sh["steps"] * unet_step_flops(b.model, sh["batch"])
    fl_router = p.router_steps * router_step_flops(b.model, b.router_cfg, p.router_batch, len(names))
    fl_router_rest = p.router_steps * router_step_flops(b.model, b.router_cfg, p.router_batch, len(names) - 1)
    fl_mono = p.steps * unet_step_flops(b.model, p.batch)
    rows = [
        (
            f"whole source ({len(d)} images)",
            "CDM: drop + router retrain",
            t_src,
            fl_router_rest,
            before,
            after_src,
        ),
        (
            f"1% of one source ({len(drop)} images)",
            "CDM: one compartment + router",
            t_samples,
            fl_comp + fl_router,
            before,
            after_samples,
        ),
        (
            f"1% of one source ({len(drop)} images)",
            "CDM: its compartment retrain alone (a part, not a complete forget)",
            comp_s,
            fl_comp,
            float("nan"),
            float("nan"),
        ),
        (f"1% of one source ({len(drop)} images)", "monolith: full retrain", mono_s, fl_mono, mono_before, mono_after),
    ]
    for request, method, secs, flops, f0, f1 in rows:
        r.add(request, method, secs, mono_s / secs, flops / 1e12, fl_mono / flops, f0, f1, (f1 - f0) / f0)
    r.facts["forget-samples speed-up (wall time)"] = (
        f"{mono_s / t_samples:.1f}x (target >= 8x: {'met' if mono_s / t_samples >= 8 else 'missed'})"
    )
    r.facts["forget-samples speed-up (FLOPs)"] = f"{fl_mono / (fl_comp + fl_router):.1f}x"
    r.facts["forget-source speed-up (wall time)"] = f"{mono_s / t_src:.1f}x"
    r.facts["router retrain share of the forget-samples FLOPs"] = f"{fl_router / (fl_comp + fl_router):.0%}"
    r.notes.append(
        "FID before/after use top-1 routing with the same seed; removing a whole source removes 1/K of "
        "the distribution, so its FID change against the full test set measures coverage, not damage."
    )
    r.notes.append(
        "Under equal compute a compartment runs as many steps as the monolith with 1/K of its batch: its FLOPs "
        "are 1/K of the monolith's, but on 2 CPU cores a small-batch step is overhead-bound, so wall time "
        "shrinks less. The router retrain (same size for every request) is the other term."
    )
    return r


def continual(p: Profile, b: Bench, shared: dict[str, Any]) -> Result:
    r = Result(
        "continual",
        "3. Continual learning: adding one more source",
        p,
        ["method", "seconds", "relative time", "train TFLOP", "relative FLOPs", "FID (top-1)"],
    )
    sh = shared["random"]
    parts: dict[str, SourceData] = dict(sh["parts"])
    rng = np.random.default_rng(p.seed + 1)
    n_new = len(next(iter(parts.values())))
    new = b.data.subset(np.sort(rng.choice(len(b.data), size=n_new, replace=False)))
    name = f"new{len(parts)}"
    comp, comp_s = b.train(name, new, sh["batch"], sh["steps"])
    parts[name] = new
    router, router_s = b.router(parts)
    den = ComposedDenoiser([*sh["comps"], comp], router, list(parts))
    f = b.score(den, top_k=1)["fid"]
    add_s = comp_s + router_s
    k = len(parts)
    all_cdm = sh["train_s"] * k / (k - 1) + router_s
    fl_comp = sh["steps"] * unet_step_flops(b.model, sh["batch"])
    fl_router = p.router_steps * router_step_flops(b.model, b.router_cfg, p.router_batch, k)
    fl_mono = p.steps * unet_step_flops(b.model, p.batch)  # same recipe: steps are fixed, data grows
    fl_add = fl_comp + fl_router
    r.add(f"CDM: train compartment #{k} + router", add_s, 1.0, fl_add / 1e12, 1.0, f)
    r.add(
        f"CDM: retrain all {k} compartments + router (time estimated from this run's per-compartment time)",
        all_cdm,
        all_cdm / add_s,
        (k * fl_comp + fl_router) / 1e12,
        (k * fl_comp + fl_router) / fl_add,
        float("nan"),
    )
    r.add(
        "monolith: retrain on all data (time of this run's monolith)",
        shared["mono_s"],
        shared["mono_s"] / add_s,
        fl_mono / 1e12,
        fl_mono / fl_add,
        float("nan"),
    )
    r.notes.append(
        f"the new source is {n_new} images resampled from the training set (Fashion-MNIST has no "
        "unseen training data); only its compartment and the router are trained."
    )
    return r


def memorisation_bench(p: Profile, b: Bench) -> Result:
    r = Result(
        "memorisation",
        f"4. Memorisation in a small-data regime ({p.memo_n} training images, {p.memo_steps} steps)",
        p,
        ["method", "memorised fraction", "d1/d2 < 0.5", "median d1/d2", "samples", "train s"],
    )
    rng = np.random.default_rng(p.seed + 2)
    small = b.data.subset(np.sort(rng.choice(len(b.data), size=p.memo_n, replace=False)))
    half = p.memo_n // 2
    parts = {"m0": small.subset(slice(0, half)), "m1": small.subset(slice(half, None))}
    train_px = {k: from_model_tensor(to_model_tensor(v.images, p.sample_size)) for k, v in parts.items()}
    mono, mono_s = b.train("memo-mono", small, p.batch, p.memo_steps)
    comps, secs = [], 0.0
    for n, d in parts.items():
        c, s = b.train(n, d, max(1, p.batch // 2), p.memo_steps)  # equal compute: half the batch each
        comps.append(c)
        secs += s
    with timer() as t:
        small_router = dataclasses.replace(b.router_cfg, steps=min(100, p.router_steps), batch_size=64)
        router = train_router(parts, model=b.model, router=small_router, num_classes=10, progress=False).router
    n_gen = max(64, 4 * p.memo_n)
    for label, den, secs_ in (
        ("monolith", single(mono, "monolith"), mono_s),
        ("CDM, 2 compartments (full)", ComposedDenoiser(comps, router, list(parts)), secs + t["s"]),
    ):
        imgs, _ = generate(den, b.model, n_gen, steps=p.sample_steps, seed=p.seed)
        m = memorisation(imgs, train_px)
        ratio = m.distance_ratio
        r.add(label, m.fraction, float((ratio < 0.5).mean()), float(np.median(ratio)), m.n, secs_)
    r.notes.append(
        "memorised = nearest training image closer than 1/3 of the second nearest (pixel L2, Carlini et al. 2023); "
        "d1/d2 near 1 means the sample is no closer to one training image than to another."
    )
    r.notes.append(
        f"each compartment sees {half} images for {p.memo_steps} steps at half the batch (equal compute), so every "
        "training image is seen as often as by the monolith; the paper reports that CDMs reduce memorisation."
    )
    return r


def _plot_budget(out: Path, rows: list[tuple[int, float]], quality: Result) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([s for s, _ in rows], [f for _, f in rows], "o-", label="monolith")
    for row in quality.rows:
        if row[2] == "top-1" and "equal" in str(row[1]):
            ax.axhline(row[3], ls="--", lw=1, label=f"CDM {row[0]} top-1 (equal compute)")
    ax.set_xlabel("optimizer steps")
    ax.set_ylabel("FID (lower is better)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "fid_vs_budget.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_trajectory(out: Path, den: ComposedDenoiser, b: Bench) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cdm.pipeline import CompartmentalPipeline, make_scheduler

    pipe = CompartmentalPipeline(den, make_scheduler("dpm", b.model))
    o = pipe(
        batch_size=4,
        num_inference_steps=b.p.sample_steps,
        generator=torch.Generator().manual_seed(1),
        return_trajectory=True,
        progress=False,
    )
    assert o.trajectory is not None and o.timesteps is not None
    fig, axes = plt.subplots(1, 4, figsize=(11, 2.8), sharey=True)
    for i, ax in enumerate(axes):
        for k, name in enumerate(o.source_names):
            ax.plot(o.timesteps, o.trajectory[:, i, k], label=name)
        ax.invert_xaxis()
        ax.set_xlabel("timestep t (sampling runs right)")
        ax.set_title(f"sample {i}")
    axes[0].set_ylabel("router weight w_i")
    axes[-1].legend(fontsize=6, loc="upper left")
    fig.tight_layout()
    path = out / "router_trajectory.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
