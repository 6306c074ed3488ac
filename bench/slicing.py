"""SISA slicing for forget-samples (Bourtoule et al. 2021): the expected retrain over uniformly placed requests,
analytic and measured, and what slicing costs in quality and storage.

The compartment is the forgetting benchmark's: one source of the random split, equal compute (batch B/K,
``p.steps`` steps). It is trained with ``[train] slices = 1`` and with each S of ``p.sisa_slices``. For every S:

* analytic: a request forgetting one sample drawn uniformly from the source lands in slice k with probability
  n_k / N and retrains ``steps - start_k`` steps (``SlicePlan.expected_retrain_steps``); speed-up = steps / E[steps].
* measured: one forget-samples request per slice k (a sample of slice k) through the offline lifecycle, each on a
  fresh copy of the trained store, with the density router (no router retrain: the compartment's own cost; a learnt
  router adds the same retrain to every S); E[seconds] = sum_k (n_k / N) seconds_k, against the slices = 1 request.
* quality: FID of the compartment alone (``p.n_fid`` samples) and its held-out denoising loss (eps MSE on test
  images at fixed timesteps and noise: lower variance than FID at small sample counts), against slices = 1.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler

from bench.common import Profile, Result
from bench.quality import Bench, single
from cdm.compartment import Compartment
from cdm.config import ModelConfig
from cdm.data import SourceData, load_fashion_mnist, split_sources, to_model_tensor
from cdm.metrics import FeatureExtractor
from cdm.store import LocalStore
from cdm.training import SlicePlan


def heldout_loss(comp: Compartment, data: SourceData, model: ModelConfig, *, seed: int, levels: int = 10) -> float:
    """Mean eps-prediction MSE (Ho et al. 2020, eq. 14) on held-out images at ``levels`` evenly spaced timesteps."""
    x0 = to_model_tensor(data.images, model.sample_size)
    labels = torch.as_tensor(data.labels) if data.labels is not None else None
    scheduler = DDPMScheduler(**model.scheduler_config())
    g = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    with torch.no_grad():
        for t in torch.linspace(0, model.num_train_timesteps - 1, levels).long().tolist():
            noise = torch.randn(x0.shape, generator=g)
            tt = torch.full((len(x0),), int(t), dtype=torch.long)
            x_t = scheduler.add_noise(x0, noise, tt)
            for i in range(0, len(x0), 500):
                c = labels[i : i + 500] if labels is not None else None
                pred = comp(x_t[i : i + 500], tt[i : i + 500], c)
                total += float(torch.nn.functional.mse_loss(pred, noise[i : i + 500], reduction="sum"))
                count += pred.numel()
    return total / count


def run(p: Profile, out: Path, ext: FeatureExtractor) -> Result:
    b = Bench(p, out, ext)
    source = split_sources(b.data, "random", p.k, seed=p.seed)[0]
    batch = max(1, p.batch // p.k)
    base = b.train_cfg(batch, p.steps)
    heldout = load_fashion_mnist("test").subset(slice(0, p.sisa_eval_n))
    r = Result(
        "slicing",
        f"2b. SISA slicing for forget-samples: one compartment ({len(source)} images, {p.steps} steps x B={batch}), "
        "retrained from the checkpoint before the forgotten sample's slice",
        p,
        [
            "slices",
            "train s",
            "E[steps retrained] (analytic)",
            "speed-up (analytic)",
            "E[forget s] (measured)",
            "speed-up (measured)",
            "E[retrain s] (measured)",
            "checkpoints MB",
            "held-out loss",
            "loss change",
            "FID",
            "FID change",
        ],
    )
    baseline: dict[str, float] = {}
    # the reference of the ">= 8x": retraining the monolith (all K sources at batch B) without one sample,
    # timed in this run next to the compartment's forget requests (the density router retrains nothing)
    one = int(source.ids[0])
    _, mono_s = b.train("monolith-forget", b.data.subset(b.data.ids != one), p.batch, p.steps)
    r.columns.append("vs monolith retrain (wall)")
    with tempfile.TemporaryDirectory(prefix="cdm-bench-slicing-") as tmp:
        for slices in (1, *p.sisa_slices):
            cfg = dataclasses.replace(base, slices=slices)
            plan = SlicePlan.of(source, cfg)
            # 1. train the compartment with this many slices (its checkpoints kept beside it)
            store = LocalStore(Path(tmp) / f"s{slices}", model=b.model)
            store.stage_data("src", source)
            train_s = store.train_compartment("src", cfg, progress=False).seconds
            comp = store.load_compartment("src", device=p.device)
            ckpt = store.compartment_dir("src") / "slices"
            ckpt_mb = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file()) / 1e6 if ckpt.is_dir() else 0.0
            # 2. quality against slices = 1
            loss = heldout_loss(comp.cpu(), heldout, b.model, seed=p.seed)
            fid_value = b.score(single(comp.to(p.device), "src"))["fid"]
            # 3. one forget request per slice, each on a fresh copy of the store
            forget_s, retrain_s = [], []
            for k in range(1, slices + 1):
                trial = Path(tmp) / f"s{slices}-k{k}"
                shutil.copytree(store.root, trial)
                victim = int(source.ids[plan.assignment == k - 1][0])
                copy = LocalStore(trial)
                lc = copy.lifecycle(train=cfg, router_kind="density", progress=False)
                receipt = lc.forget_samples("src", [victim], request_id=f"bench-s{slices}-k{k}")
                assert receipt.resumed_from_slice == k - 1 and receipt.steps_retrained == p.steps - plan.start(k)
                forget_s.append(receipt.seconds)
                retrain_s.append(copy.manifest("src").train_seconds)
                shutil.rmtree(trial)
            share = np.asarray(plan.counts, dtype=float) / len(source)
            e_steps = plan.expected_retrain_steps()
            e_forget, e_retrain = float(share @ forget_s), float(share @ retrain_s)
            if slices == 1:
                baseline = {"forget": e_forget, "loss": loss, "fid": fid_value}
            r.add(
                slices,
                train_s,
                e_steps,
                p.steps / e_steps,
                e_forget,
                baseline["forget"] / e_forget,
                e_retrain,
                ckpt_mb,
                loss,
                (loss - baseline["loss"]) / baseline["loss"],
                fid_value,
                (fid_value - baseline["fid"]) / baseline["fid"],
                mono_s / e_forget,
            )
            shutil.rmtree(store.root)
    best = max(r.rows, key=lambda row: row[5])
    r.facts["best measured forget-samples speed-up from slicing"] = (
        f"{best[5]:.2f}x at slices = {best[0]} (analytic {best[3]:.2f}x; SISA's bound with equal step shares is "
        "2S / (S + 1) < 2x)"
    )
    r.facts["its quality cost"] = f"held-out loss {best[9]:+.1%}, FID {best[11]:+.1%} against slices = 1"
    r.facts["forget-samples with the density router vs retraining the monolith (wall)"] = (
        f"{r.rows[0][-1]:.2f}x without slicing, {best[-1]:.2f}x at slices = {best[0]} "
        f"(monolith retrain {mono_s:.1f} s: {p.steps} steps x B={p.batch} on all {p.k} sources)"
    )
    r.notes.append(
        "every retrain is exact: it starts from the checkpoint after the last slice without a forgotten sample and "
        "gives the same weights as training from scratch on the data left with the same seed and slices "
        "(tests/cdm/test_slicing.py); checkpoints at and after the forgotten sample's slice are rebuilt."
    )
    r.notes.append(
        "slice j trains on slices 1..j for steps / S steps (equal shares), so a request retrains (S - k + 1) / S of "
        "the steps: the expected cost is about (S + 1) / (2S) of a full retrain and the speed-up stays below 2x; "
        "'E[forget s]' is the whole offline request (data copy, fingerprints, checkpoint copy and upload, delete), "
        "'E[retrain s]' its training alone."
    )
    return r
