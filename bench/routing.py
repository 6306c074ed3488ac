"""8. Router kinds side by side (issue 12): the learnt router, training-free density weights (SuperDiff) and
per-source density-ratio heads on the same compartments, in one run.

The compartments of each split are trained once (``bench.quality``'s code, equal compute) and composed under every
kind; every kind samples with the same stochastic sampler (``Profile.routing_scheduler``, SDE-DPM-Solver++: the
density kind's Itô estimator needs one) and the same seeds. Sections:

1. quality: FID ratio to the monolith per split and kind (learnt full / top-1, density full / pruned, heads full /
   top-1), compartment
   evaluations per image and step, and attribution agreement with the ground truth on the by-class split (each
   sample's dominant source vs its class's source, the class read by the metrics classifier).
2. sampling cost vs K (random compartments, as in ``bench.sampling``): density's K passes vs learnt and heads full and
   top-1.
3. guidance: FID and class accuracy against ``guidance_scale``; the lowest FID is the measured default.
4. forgetting and continual learning per kind, end to end through ``LocalStore``'s lifecycle: forget-samples (1% of
   one source, FID change), adding one source (a compartment, + a router over every source for the learnt kind, + its
   head for the heads kind), forget-source; wall time and FLOPs vs retraining the monolith.

The heads (cdm/routing/heads.py) depend on each source's data only: they are trained once per source with the bench's
``[router]`` budget (``heads_for``) and reused by every composition, and by 8.5 in the same process, on the same data.
"""

from __future__ import annotations

import json
import tempfile
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bench.common import Profile, Result, router_step_flops, timer, unet_step_flops
from bench.quality import SPLITS, Bench, single, split_parts, train_parts
from cdm.artifacts import remove_tree, upload_directory
from cdm.attribution import attribution_agreement
from cdm.compartment import Compartment, CompartmentHead, build_unet, new_manifest
from cdm.compose import Composed, ComposedDenoiser
from cdm.config import ModelConfig, RouterConfig, RoutingKind, TrainConfig, to_dict
from cdm.data import SourceData, fingerprint
from cdm.lifecycle import Lifecycle, compartment_prefix
from cdm.metrics import FeatureExtractor, fid, kid
from cdm.pipeline import CompartmentalPipeline, make_scheduler
from cdm.routing import (
    HeadsComposition,
    HeadsRouter,
    PruneConfig,
    Router,
    check_kind,
    compose_trained,
    train_head,
)
from cdm.store import LocalStore

KINDS: tuple[RoutingKind, ...] = ("learnt", "density", "heads")
SAMPLE_BATCH = 250  # images per pipeline call when scoring
COST_REPEATS = 3  # timed runs per configuration of the cost table; the median is reported
# the (kind, mode) rows of the cost table at each K > 1
COSTED: tuple[tuple[str, str], ...] = (
    ("learnt", "full"),
    ("learnt", "top-1"),
    ("density", "full"),
    ("heads", "full"),
    ("heads", "top-1"),
)
NAN = float("nan")


# --------------------------------------------------------------------------------------------- helpers


class EvalCounter:
    """Counts the rows every compartment of a composition is evaluated on (forward hooks), i.e. its real compute."""

    def __init__(self, compartments: Iterable[nn.Module]) -> None:
        self.rows = 0
        self._handles = [c.register_forward_hook(self._hook) for c in compartments]

    def _hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        self.rows += int(args[0].shape[0])

    def close(self) -> None:
        for h in self._handles:
            h.remove()


@dataclass
class Sampled:
    """Images from one composition and what it cost; trajectory (T, N, K) and alphas_cumprod (T,) for attribution."""

    images: np.ndarray
    trajectory: np.ndarray
    alphas_cumprod: np.ndarray
    seconds: float
    evals: float  # compartment row-evaluations per image and sampling step
    labels: np.ndarray | None = None


def draw(
    p: Profile,
    comp: Composed,
    n: int,
    *,
    top_k: int | None = None,
    labels: np.ndarray | None = None,
    guidance_scale: float = 1.0,
    steps: int | None = None,
) -> Sampled:
    """n images from ``comp`` with the routing group's sampler and seed (the same noise for every kind)."""
    steps = steps or p.sample_steps
    pipe = CompartmentalPipeline(comp, make_scheduler(p.routing_scheduler, comp.model_config))
    g = torch.Generator().manual_seed(p.seed)
    counter = EvalCounter(comp.compartments)
    imgs, trajs = [], []
    abar = np.zeros(0)
    started = time.perf_counter()
    try:
        for start in range(0, n, SAMPLE_BATCH):
            m = min(SAMPLE_BATCH, n - start)
            out = pipe(
                batch_size=m,
                class_labels=None if labels is None else torch.as_tensor(labels[start : start + m]),
                top_k=top_k,
                num_inference_steps=steps,
                generator=g,
                return_trajectory=True,
                progress=False,
                guidance_scale=guidance_scale,
            )
            assert out.trajectory is not None and out.alphas_cumprod is not None
            imgs.append(out.images)
            trajs.append(out.trajectory)
            abar = out.alphas_cumprod
    finally:
        counter.close()
    seconds = time.perf_counter() - started
    return Sampled(
        np.concatenate(imgs), np.concatenate(trajs, axis=1), abar, seconds, counter.rows / (n * steps), labels
    )


def density(comps: Sequence[Compartment], names: Sequence[str], prune: PruneConfig | None = None) -> Composed:
    """The density kind over ``comps``: priors and class priors from their manifests, as a sampler builds it."""
    return compose_trained("density", comps, names, prune=prune)


def with_head(comp: Compartment, head: CompartmentHead) -> Compartment:
    """``comp`` carrying ``head`` (the same network and manifest: the other kinds' compositions stay head-free)."""
    return Compartment(comp.unet, comp.manifest, head)


def headed(comps: Sequence[Compartment], names: Sequence[str], heads: Sequence[CompartmentHead]) -> Composed:
    """The heads kind over ``comps`` with ``heads`` (one per source, in order): priors and class priors from the
    manifests, as a sampler builds it; top-k is the sampler's ``top_k``."""
    return compose_trained("heads", [with_head(c, h) for c, h in zip(comps, heads, strict=True)], names)


_HEADS: dict[tuple[str, str, str], CompartmentHead] = {}  # (source, data fingerprint, configs) -> its trained head


def heads_for(
    model: ModelConfig, router: RouterConfig, parts: dict[str, SourceData]
) -> tuple[list[CompartmentHead], float]:
    """Each source's head (``train_head`` on its data alone with ``router``: the bench's ``[router]`` budget) and
    their training seconds (as each head recorded them). A head depends on its data and configs only, so it is
    trained once per process and reused, e.g. by 8.5's K x compute compartments of the same split; a reused head
    keeps its seconds."""
    heads: list[CompartmentHead] = []
    for name, data in parts.items():
        key = (name, fingerprint(data), json.dumps([to_dict(router), to_dict(model)], sort_keys=True))
        if key not in _HEADS:
            _HEADS[key] = train_head(name, data, model=model, router=router, num_classes=10, progress=False)
        heads.append(_HEADS[key])
    return heads, sum(float(h.doc["train_seconds"]) for h in heads)


def register(
    lc: Lifecycle, name: str, data: SourceData, comp: Compartment, head: CompartmentHead | None = None
) -> None:
    """Register an already trained compartment (with ``head``: carrying it, for a heads store) in a store, as
    ``Lifecycle.train`` does after training (keep the data copy, upload, activate): the benchmark trains each
    compartment once and composes it under every kind."""
    fp = fingerprint(data)
    entry = lc.catalogue.begin_training(name, fp, {"source": name, "bench": "routing"})
    lc.keep_data(name, data, fp)
    out = lc.work_root / "out" / entry.compartment_id
    manifest = (comp if head is None else with_head(comp, head)).to("cpu").save(out)
    cid = entry.compartment_id
    files = upload_directory(lc.store, out, compartment_prefix(cid))
    others = sum(e.n_samples for e in lc.catalogue.active() if e.source != name)
    lc.catalogue.activate(
        cid,
        artifact_uri=lc.store.url(compartment_prefix(cid)) + "/",
        files=files,
        prior=len(data) / max(1, len(data) + others),
        class_counts=manifest.class_counts,
        n_samples=len(data),
        train_metrics={"steps": manifest.steps, "seconds": manifest.train_seconds, "registered_by": "bench.routing"},
    )
    remove_tree(out)


def loaded(store: LocalStore, device: str) -> tuple[list[Compartment], list[str]]:
    """The store's active compartments, loaded and hash-checked, and their source names."""
    names = store.sources()
    return [store.load_compartment(n, device=device) for n in names], names


def choose_guidance(rows: Sequence[tuple[float, float, float]]) -> float:
    """The measured default guidance scale from (scale, FID, class accuracy) rows: the lowest FID; among scales
    within 1% of it, the higher class accuracy, then the smaller scale."""
    if not rows:
        raise ValueError("no guidance measurements to choose a default from")
    best = min(f for _, f, _ in rows)
    near = [r for r in rows if r[1] <= best * 1.01]
    return min(near, key=lambda r: (-r[2], r[0]))[0]


# --------------------------------------------------------------------------------------------- quality rows
# shared by 8.1 (equal compute, below) and 8.5 (K x compute, bench/routing_converged.py): the same monolith
# reference, kinds, sampler, scoring and attribution agreement

QUALITY_COLUMNS: tuple[str, ...] = (
    "split",
    "kind",
    "routing",
    "FID",
    "KID",
    "FID / monolith",
    "compartment evals / image / step",
    "sample s",
    "trained (s)",
    "attribution agreement: mean / alpha_bar / snr",
)
QUALITY_NOTES: tuple[str, ...] = (
    "trained (s): the compartments' training time, plus the router's for the learnt kind and the K heads' for the "
    "heads kind (density trains nothing beyond the compartments).",
    "heads: one density-ratio classifier per compartment (cdm/routing/heads.py, the learnt router's network with one "
    "output), trained on its source alone against N(0, I) draws with the [router] budget (router steps x batch: "
    "half the source's noised images, half reference draws); w = softmax(log prior + head logits); top-1 runs one "
    "compartment and all K heads per step.",
    "compartment evals / image / step: rows the compartments actually ran on (forward hooks), per image and "
    "sampling step: K for a full mixture, 1 for top-1; pruning lowers it as compartments drop out.",
    "attribution agreement: share of samples whose dominant source (argmax of the weights averaged over the "
    "steps, under each weighting of cdm/attribution.py) is the source holding the class the metrics "
    "classifier reads in the image.",
)


def score(b: Bench, s: Sampled) -> tuple[float, float]:
    """FID and KID (mean) of ``s``'s images against the bench's reference features."""
    feats = b.ext.features(s.images)
    k_mean, _ = kid(feats, b.ref_feats, subset_size=min(500, len(feats)))
    return fid(feats, b.ref_feats), k_mean


def monolith_row(p: Profile, b: Bench, r: Result) -> tuple[Compartment, float, float]:
    """The reference: the monolith at ``p.steps`` x B on all data, sampled like every kind; adds its row to ``r``
    and returns it, its training seconds and its FID."""
    mono, mono_s = b.train("monolith", b.data, p.batch, p.steps)
    s = draw(p, single(mono, "monolith"), p.n_fid)
    mono_fid, mono_kid = score(b, s)
    r.add("all data", "monolith", "-", mono_fid, mono_kid, 1.0, s.evals, s.seconds, mono_s, "-")
    return mono, mono_s, mono_fid


def class_owner(parts: dict[str, SourceData]) -> np.ndarray:
    """The index of the source holding each of the 10 classes (the by-class split's ground truth)."""
    truth = np.zeros(10, dtype=np.int64)
    for i, d in enumerate(parts.values()):
        if d.labels is None:
            raise ValueError(f"source #{i} has no labels: attribution agreement needs the by-class split's labels")
        truth[np.unique(d.labels)] = i
    return truth


def kind_rows(
    p: Profile,
    b: Bench,
    r: Result,
    split: str,
    parts: dict[str, SourceData],
    comps: list[Compartment],
    learnt: Composed,
    train_s: float,
    router_s: float,
    mono_fid: float,
    scores: dict[tuple[str, str, str], float],
) -> None:
    """One split's rows of the quality table: learnt full and top-1, density full and pruned (``p.prune``), heads
    full and top-1 (``heads_for``'s heads, trained once per source) over the same ``comps``; FID, KID, ratio to
    ``mono_fid``, compartment evaluations, seconds and (by-class) attribution agreement. Each FID goes to
    ``scores[(split, kind, routing)]``, each agreement (snr weighting) to ``scores[(split, kind, routing +
    ":agreement")]``."""
    names = list(parts)
    truth = class_owner(parts) if split == "by-class" else None
    rows: list[tuple[RoutingKind, str, Composed, int | None, float]] = [
        ("learnt", "full", learnt, None, train_s + router_s),
        ("learnt", "top-1", learnt, 1, train_s + router_s),
        ("density", "full", density(comps, names), None, train_s),
    ]
    rows += [
        ("density", prune_label(pc), density(comps, names, pc), None, train_s)
        for pc in (PruneConfig(threshold=t, patience=k) for t, k in p.prune)
    ]
    heads, heads_s = heads_for(b.model, b.router_cfg, parts)
    by_heads = headed(comps, names, heads)
    rows += [("heads", "full", by_heads, None, train_s + heads_s), ("heads", "top-1", by_heads, 1, train_s + heads_s)]
    for kind, routing, comp, top_k, trained in rows:
        s = draw(p, comp, p.n_fid, top_k=top_k)
        f, k = score(b, s)
        scores[(split, kind, routing)] = f
        agree = "n/a"
        if truth is not None:
            a = attribution_agreement(s.trajectory, s.alphas_cumprod, truth[b.ext.predict(s.images)])
            agree = f"{a['mean']:.3f} / {a['alpha_bar']:.3f} / {a['snr']:.3f}"
            scores[(split, kind, routing + ":agreement")] = a["snr"]
        r.add(split, kind, routing, f, k, f / mono_fid, s.evals, s.seconds, trained, agree)


def prune_label(pc: PruneConfig) -> str:
    """The routing column of a pruned density row."""
    return f"pruned (w < {pc.threshold:g} for {pc.patience} steps)"


# --------------------------------------------------------------------------------------------- the run


@dataclass
class Section:
    """The sections of the routing benchmark, written as one routing.json / routing.md."""

    profile: Profile
    results: list[Result] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def write(self, out: Path, env: dict[str, Any]) -> None:
        doc = {
            "name": "routing",
            "title": "8. Router kinds",
            "profile": self.profile.to_dict(),
            "environment": env,
            "facts": self.facts,
            "sections": [
                {
                    "name": r.name,
                    "title": r.title,
                    "columns": r.columns,
                    "rows": r.rows,
                    "facts": r.facts,
                    "notes": r.notes,
                    "plots": r.plots,
                    "seconds": r.seconds,
                }
                for r in self.results
            ],
            "seconds": self.seconds,
        }
        out.mkdir(parents=True, exist_ok=True)
        (out / "routing.json").write_text(json.dumps(doc, indent=2, default=str))
        (out / "routing.md").write_text(self.markdown())

    def markdown(self) -> str:
        p = self.profile
        lines = [
            "### 8. Router kinds: learnt router vs training-free density weights (SuperDiff) vs per-source heads, side "
            "by side",
            "",
            f"Profile `{p.name}`: K = {p.k} sources, {p.steps} steps per compartment at B = {max(1, p.batch // p.k)} "
            f"(equal compute with a {p.steps} x B = {p.batch} monolith), router {p.router_steps} x {p.router_batch} "
            f"(and each of the K heads the same), "
            f"{p.n_fid} FID samples, {p.sample_steps} {p.routing_scheduler} steps for every kind.",
            "",
        ]
        lines += [f"- **{k}**: {v}" for k, v in self.facts.items()]
        lines.append("")
        for r in self.results:
            lines.append(r.markdown().replace("### ", "#### ", 1))
        lines.append(f"_{self.seconds:.0f} s of wall time for the routing group._\n")
        return "\n".join(lines)


def run(p: Profile, out: Path, ext: FeatureExtractor, env: dict[str, Any]) -> Section:
    """Every section in order; routing.json / .md are rewritten after each one (a late failure keeps the rest)."""
    started = time.perf_counter()
    sec = Section(p)
    b = Bench(p, out, ext)
    with tempfile.TemporaryDirectory(prefix="cdm-routing-") as tmp:
        ctx = _Context(p, b, Path(tmp))
        for part in (ctx.quality, ctx.cost, ctx.guidance, ctx.forgetting):
            t = time.perf_counter()
            res = part()
            res.seconds = time.perf_counter() - t
            sec.results.append(res)
            sec.facts = dict(ctx.summary)
            sec.seconds = time.perf_counter() - started
            sec.write(out, env)
            print(f"routing: {res.name} done in {res.seconds:.0f}s", flush=True)
    return sec


class _Context:
    """What the sections share: the bench, the monolith, the compartments of each split and the two stores."""

    def __init__(self, p: Profile, b: Bench, tmp: Path) -> None:
        self.p, self.b, self.tmp = p, b, tmp
        self.batch = max(1, p.batch // p.k)  # equal compute: each compartment gets B / K
        self.summary: dict[str, Any] = {}
        self.scores: dict[tuple[str, str, str], float] = {}  # (split, kind, routing) -> FID
        self.random: dict[str, Any] = {}

    # -- scoring ------------------------------------------------------------------------------------
    def score(self, s: Sampled) -> tuple[float, float]:
        return score(self.b, s)

    def router_cfg(self) -> RouterConfig:
        return self.b.router_cfg

    def train_cfg(self) -> TrainConfig:
        return self.b.train_cfg(self.batch, self.p.steps)

    def lifecycle(self, store: LocalStore, kind: RoutingKind) -> Lifecycle:
        return store.lifecycle(train=self.train_cfg(), router=self.router_cfg(), router_kind=kind, progress=False)

    # -- 1. quality and attribution ---------------------------------------------------------------------
    def quality(self) -> Result:
        p, b = self.p, self.b
        r = Result(
            "routing-quality",
            f"8.1 Quality per router kind (FID on {p.n_fid} samples, equal compute) and attribution agreement "
            "(by-class split)",
            p,
            list(QUALITY_COLUMNS),
        )
        _, self.mono_s, self.mono_fid = monolith_row(p, b, r)
        for split in SPLITS:
            parts = split_parts(b, split)
            comps, train_s = train_parts(b, parts, self.batch, p.steps)
            learnt, router_s = self._learnt(split, parts, comps)
            kind_rows(p, b, r, split, parts, comps, learnt, train_s, router_s, self.mono_fid, self.scores)
            if split == "random":
                heads, _ = heads_for(b.model, b.router_cfg, parts)  # trained by _learnt for the heads store
                self.random = {
                    "parts": parts,
                    "comps": comps,
                    "learnt": learnt,
                    "router_s": router_s,
                    "heads": headed(comps, list(parts), heads),
                }
        for split in SPLITS:
            learnt_best = min(self.scores[(split, "learnt", m)] for m in ("full", "top-1"))
            dens = self.scores[(split, "density", "full")]
            hf, h1 = (self.scores[(split, "heads", m)] for m in ("full", "top-1"))
            self.summary[f"FID / monolith, {split}"] = (
                f"learnt best {learnt_best / self.mono_fid:.2f}, density full {dens / self.mono_fid:.2f}, "
                f"heads full {hf / self.mono_fid:.2f} / top-1 {h1 / self.mono_fid:.2f}"
            )
        self.summary["attribution agreement (by-class, snr weighting)"] = ", ".join(
            f"{kind} full {self.scores[('by-class', kind, 'full:agreement')]:.3f}" for kind in KINDS
        )
        r.notes += QUALITY_NOTES
        return r

    def _learnt(
        self, split: str, parts: dict[str, SourceData], comps: list[Compartment]
    ) -> tuple[ComposedDenoiser, float]:
        """The learnt composition. On the random split through one store per kind (learnt, density, heads) holding
        the same compartments (the heads store's carrying their heads), which the forgetting and continual sections
        then change; by-class in memory."""
        names = list(parts)
        if split != "random":
            router, router_s = self.b.router(parts)
            return ComposedDenoiser(comps, router, names), router_s
        heads, _ = heads_for(self.b.model, self.b.router_cfg, parts)
        self.stores = {kind: LocalStore(self.tmp / kind, model=self.b.model) for kind in KINDS}
        for kind, store in self.stores.items():
            store.use_routing(kind)  # the store's kind, as `cdm train --store` records it
            lc = self.lifecycle(store, kind)
            for name, c, h in zip(names, comps, heads, strict=True):
                register(lc, name, parts[name], c, h if kind == "heads" else None)
        for c in comps:
            c.to(self.p.device)
        with timer() as t:
            outcome = self.lifecycle(self.stores["learnt"], "learnt").retrain_router()
        assert outcome is not None
        den = self.stores["learnt"].composed(device=self.p.device)
        assert isinstance(den, ComposedDenoiser)
        return den, t["s"]

    # -- 2. sampling cost vs K ------------------------------------------------------------------------
    def cost(self) -> Result:
        p = self.p
        r = Result(
            "routing-cost",
            f"8.2 Sampling cost vs K ({p.sampling_batch} images, {p.sample_steps} {p.routing_scheduler} steps, "
            f"median of {COST_REPEATS} rounds; random compartments; 'single' is one bare model)",
            p,
            ["K", "kind", "mode", "s / image", "x single model", "compartment evals / image / step"],
        )
        configs = [(1, "-", "single")]
        configs += [(k, kind, mode) for k in p.sampling_ks if k > 1 for kind, mode in COSTED]
        comps = self._random_compartments(max(p.sampling_ks))
        built = [(self._costed(comps[:k], kind, mode), 1 if mode == "top-1" else None) for k, kind, mode in configs]
        for comp, top_k in built:
            draw(p, comp, p.sampling_batch, top_k=top_k, steps=2)  # warm-up
        # rounds over every configuration, so a change in the shared machine's load hits them all alike
        times: list[list[float]] = [[] for _ in configs]
        evals = [0.0] * len(configs)
        for _ in range(COST_REPEATS):
            for i, (comp, top_k) in enumerate(built):
                s = draw(p, comp, p.sampling_batch, top_k=top_k)
                times[i].append(s.seconds / p.sampling_batch)
                evals[i] = s.evals
        secs = [float(np.median(t)) for t in times]
        base = secs[0]
        for (k, kind, mode), sec_, ev in zip(configs, secs, evals, strict=True):
            r.add(k, kind, mode, sec_, sec_ / base, ev)
        biggest = max(p.sampling_ks)
        by = {c: t for c, t in zip(configs, secs, strict=True)}
        if (biggest, "density", "full") in by:
            self.summary[f"sampling cost at K={biggest}"] = (
                ", ".join(f"{kind} {mode} {by[(biggest, kind, mode)] / base:.2f}x" for kind, mode in COSTED)
                + " one model"
            )
        r.notes.append(
            "density routing has no top-1: every allowed compartment runs at every step to track its log-density "
            "(pruning, in 7.1, is its approximation); the Itô bookkeeping is a few dot products per step."
        )
        r.notes.append(
            "heads top-1 runs one compartment and all K heads per step (a head is the learnt router's network with "
            "one output, so K head passes cost about K router passes); heads full runs all K of each."
        )
        return r

    def _random_compartments(self, k: int) -> list[Compartment]:
        torch.manual_seed(0)
        return [
            Compartment(
                build_unet(self.b.model, 10).eval(),
                new_manifest(
                    f"s{i}",
                    fingerprint="-",
                    n_samples=1,
                    class_counts=[],
                    num_classes=10,
                    model=self.b.model,
                    train=TrainConfig(),
                ),
            ).to(self.p.device)
            for i in range(k)
        ]

    def _costed(self, comps: list[Compartment], kind: str, mode: str) -> Composed:
        """The composition a cost row times: one bare model, the learnt router over ``comps``, random heads (one
        per compartment, the router's network with one output) or density."""
        names = [c.manifest.name for c in comps]
        if mode == "single":
            return single(comps[0], names[0])
        if kind == "learnt":
            router = Router(source_names=names, sample_size=self.p.sample_size, num_classes=10).to(self.p.device)
            return ComposedDenoiser(comps, router, names)  # "auto": the loop on CPU, vmap on CUDA
        if kind == "heads":
            nets = [
                Router(source_names=[n], sample_size=self.p.sample_size, num_classes=10).to(self.p.device).eval()
                for n in names
            ]
            return HeadsComposition(comps, HeadsRouter(nets, names), names)
        return density(comps, names)

    # -- 3. forgetting and 4. continual ---------------------------------------------------------------
    def forgetting(self) -> Result:
        p, b = self.p, self.b
        r = Result(
            "routing-forgetting",
            "8.4 Forgetting and continual learning per router kind (random split, end to end through the store's "
            "lifecycle: journal, training, upload, catalogue, deletion)",
            p,
            [
                "request",
                "kind",
                "what is trained",
                "seconds",
                "speed-up (wall)",
                "train TFLOP",
                "speed-up (FLOPs)",
                "FID before",
                "FID after",
                "FID change",
            ],
        )
        parts: dict[str, SourceData] = self.random["parts"]
        names = list(parts)
        k = len(names)
        victim = names[0]
        fl_comp = p.steps * unet_step_flops(b.model, self.batch)
        fl_mono = p.steps * unet_step_flops(b.model, p.batch)

        def fl_router(n: int) -> int:
            return p.router_steps * router_step_flops(b.model, b.router_cfg, p.router_batch, n)

        fl_head = fl_router(1)  # a head: the router's network with one output, the same steps x batch

        # a) 1% of one source: learnt retrains the compartment and the router, density the compartment only, heads
        #    the compartment and its head, the monolith everything; the monolith is timed amid the kinds, so all
        #    see alike machine load
        d = parts[victim]
        rng = np.random.default_rng(p.seed)
        ids = rng.choice(d.ids, size=max(1, round(len(d) * p.forget_fraction)), replace=False)
        routing = {"learnt": ("top-1", 1), "density": ("full", None), "heads": ("top-1", 1)}
        timed: dict[str, tuple[float, float, float]] = {}  # seconds, FID before, FID after
        for step in ("learnt", "monolith", "density", "heads"):
            if step == "monolith":
                mono, secs = b.train("monolith-forget", b.data.subset(~np.isin(b.data.ids, ids)), p.batch, p.steps)
                after, _ = self.score(draw(p, single(mono, "monolith"), p.n_fid))
                timed[step] = (secs, self.mono_fid, after)
                continue
            kind = check_kind(step)
            store = self.stores[kind]
            with timer() as t:
                receipt = self.lifecycle(store, kind).forget_samples(victim, ids.tolist(), request_id=uuid.uuid4().hex)
            assert receipt.outcome == "samples-forgotten", receipt.detail
            label, top_k = routing[kind]
            after, _ = self.score(draw(p, store.composed(device=p.device), p.n_fid, top_k=top_k))
            timed[kind] = (t["s"], self.scores[("random", kind, label)], after)
        mono_s = self.mono_retrain_s = timed["monolith"][0]
        flops_of = {
            "learnt": fl_comp + fl_router(k),
            "density": fl_comp,
            "heads": fl_comp + fl_head,
            "monolith": fl_mono,
        }
        what_of = {
            "learnt": "compartment + router",
            "density": "compartment only (no router)",
            "heads": "compartment + its head",
            "monolith": "full retrain on the remaining data",
        }
        changes: dict[str, float] = {}
        for who in (*KINDS, "monolith"):
            secs, before, after = timed[who]
            flops = flops_of[who]
            changes[who] = (after - before) / before
            scored = f"FID with {who} {routing[who][0]}" if who in routing else "FID of the monolith"
            req = f"{len(ids)} samples ({p.forget_fraction:.0%}) of {victim}, {scored}"
            r.add(
                req, who, what_of[who], secs, mono_s / secs, flops / 1e12, fl_mono / flops, before, after, changes[who]
            )
            if who == "monolith":
                continue
            wall, verdict = mono_s / secs, "met" if mono_s / secs >= 8 else "missed"
            target = " (target >= 8x wall)" if who == "density" else ""
            self.summary[f"forget-samples speed-up, {who}{target}"] = (
                f"{wall:.1f}x wall, {fl_mono / flops:.1f}x FLOPs" + (f" ({verdict})" if target else "")
            )
        self.summary["FID change after forgetting 1% of one source (target <= 1%)"] = ", ".join(
            f"{kind} {v:+.1%}" + ("" if kind == "monolith" else f" ({'met' if abs(v) <= 0.01 else 'missed'})")
            for kind, v in changes.items()
        )
        # b) continual: add one source; learnt trains its compartment + a router over all K + 1, density the
        #    compartment only and serves it at once, heads the compartment + its head (timed here, on top of the
        #    density store's compartment, as the learnt kind's router is)
        rng = np.random.default_rng(p.seed + 1)
        new = b.data.subset(np.sort(rng.choice(len(b.data), size=len(d), replace=False)))
        new_name = f"rand{k}"
        with timer() as t_comp:
            self.lifecycle(self.stores["density"], "density").train(new_name, new, lineage={"source": new_name})
        comps, snames = loaded(self.stores["density"], p.device)
        served = density(comps, snames)
        check = draw(p, served, 4, steps=4)  # it samples with K + 1 compartments, no router anywhere
        lc = self.lifecycle(self.stores["learnt"], "learnt")
        register(lc, new_name, new, comps[snames.index(new_name)])
        with timer() as t_router:
            lc.retrain_router()
        with timer() as t_head:
            new_head = train_head(new_name, new, model=b.model, router=b.router_cfg, num_classes=10, progress=False)
        register(self.lifecycle(self.stores["heads"], "heads"), new_name, new, comps[snames.index(new_name)], new_head)
        add: dict[RoutingKind, tuple[float, int, str]] = {
            "learnt": (
                t_comp["s"] + t_router["s"],
                fl_comp + fl_router(k + 1),
                f"compartment #{k + 1} ({p.steps} steps) + router over {k + 1} sources ({p.router_steps} steps)",
            ),
            "density": (t_comp["s"], fl_comp, f"compartment #{k + 1} only ({p.steps} steps); served at once"),
            "heads": (
                t_comp["s"] + t_head["s"],
                fl_comp + fl_head,
                f"compartment #{k + 1} ({p.steps} steps) + its head ({p.router_steps} steps); served at once",
            ),
        }
        for kind, (secs, flops, what) in add.items():
            r.add(f"add source #{k + 1} ({len(new)} images)", kind, what, secs, NAN, flops / 1e12, NAN, NAN, NAN, NAN)
        self.summary[f"continual: adding source #{k + 1}"] = (
            f"density: one compartment ({fl_comp / 1e12:.3g} TFLOP, {add['density'][0]:.1f} s, served with "
            f"{check.evals:.0f} compartment evals per step and no router); learnt: compartment + router "
            f"({add['learnt'][1] / 1e12:.3g} TFLOP, {add['learnt'][0]:.1f} s); heads: compartment + its head "
            f"({add['heads'][1] / 1e12:.3g} TFLOP, {add['heads'][0]:.1f} s)"
        )
        # c) a whole source: learnt retires + retrains the router over the rest; density and heads retire and delete
        #    (a head lives in its compartment's directory)
        for kind in KINDS:
            store = self.stores[kind]
            epoch = store.catalogue.epoch
            with timer() as t:
                receipt = self.lifecycle(store, kind).forget_source(victim, request_id=uuid.uuid4().hex)
            assert receipt.outcome == "forgotten", receipt.detail
            assert victim not in store.sources() and not store.compartment_dir(victim).exists()
            flops = fl_router(k) if kind == "learnt" else 0
            epochs = f"epoch {epoch} -> {store.catalogue.epoch}"
            what = f"router over the other {k}" if kind == "learnt" else f"nothing (retire, delete, {epochs})"
            if kind == "heads":
                rest = self.stores[kind].composed(device=p.device)  # the other K heads still compose
                assert victim not in rest.source_names, rest.source_names
            r.add(
                f"whole source {victim} (of {k + 1})",
                kind,
                what,
                t["s"],
                self.mono_retrain_s / t["s"],
                flops / 1e12,
                fl_mono / flops if flops else float("inf"),
                NAN,
                NAN,
                NAN,
            )
            self.summary[f"forget-source, {kind}"] = f"{t['s']:.3g} s ({flops / 1e12:.3g} TFLOP of training)"
        r.notes.append(
            "seconds are end to end through LocalStore's lifecycle (journal, training, upload, catalogue, deletion); "
            "the monolith's is its retraining on the remaining data with the same recipe, timed amid the kinds' "
            "forget-samples requests (after learnt's, before density's and heads') so that all see alike load on the "
            "shared machine; every speed-up is against it."
        )
        r.notes.append(
            "FID before is the same routing and seed in 8.1 (the monolith's: its 8.1 row); the compartment retrain "
            "after a forget-samples is the same computation for every kind (same seed and data), so their FID "
            "changes differ by routing (and the learnt kind's retrained router, the heads kind's retrained head) only."
        )
        r.notes.append(
            "the whole-source rows remove 1/K of the distribution, so no FID change is reported (it measures "
            "coverage, not damage); the continual rows add a resampled source (Fashion-MNIST has no unseen data)."
        )
        r.notes.append(
            "heads: a forget-samples retrains the compartment and its head through the heads store's lifecycle (one "
            f"head: {fl_head / 1e12:.3g} TFLOP); adding a source times its head's training on top of the compartment "
            "the density store trained (the same computation), and registers both in the heads store."
        )
        return r

    # -- 5. guidance -----------------------------------------------------------------------------------
    def guidance(self) -> Result:
        p = self.p
        n = p.n_guidance or p.n_fid
        r = Result(
            "routing-guidance",
            f"8.3 Classifier-free guidance: FID and class accuracy vs guidance_scale ({n} class-balanced samples, "
            "random split)",
            p,
            [
                "kind",
                "routing",
                "guidance_scale",
                "FID",
                "class accuracy",
                "compartment evals / image / step",
                "sample s",
            ],
        )
        labels = np.arange(n) % 10
        comps, names = self.random["comps"], list(self.random["parts"])
        plan: list[tuple[str, str, Composed, int | None, Sequence[float]]] = [
            ("learnt", "top-1", self.random["learnt"], 1, p.guidance_scales),
            ("density", "full", density(comps, names), None, p.density_guidance_scales),
            ("heads", "top-1", self.random["heads"], 1, ()),
        ]
        measured: dict[str, list[tuple[float, float, float]]] = {}
        for kind, routing, comp, top_k, scales in plan:
            if not scales:  # only at the scale the learnt sweep chose (heads: always)
                scales = (choose_guidance(measured["learnt"]),)
            for scale in scales:
                s = draw(p, comp, n, top_k=top_k, labels=labels, guidance_scale=scale)
                f, _ = self.score(s)
                acc = float((self.b.ext.predict(s.images) == labels).mean())
                measured.setdefault(kind, []).append((scale, f, acc))
                r.add(kind, routing, scale, f, acc, s.evals, s.seconds)
        chosen = choose_guidance(measured["learnt"])
        self.summary["guidance default (lowest FID, learnt)"] = f"guidance_scale = {chosen:g}"
        r.facts["chosen default"] = (
            f"guidance_scale = {chosen:g}: the lowest FID of the learnt sweep (ties within 1%: the higher class "
            "accuracy, then the smaller scale)"
        )
        r.notes.append(
            "the random split's compartments of 7.1; each branch is composed with its own weights "
            "(cdm/guidance.py), so a guided step costs twice the compartment rows of an unguided one."
        )
        r.notes.append("heads top-1 is measured at the learnt kind's chosen scale only (no sweep of its own).")
        return r
