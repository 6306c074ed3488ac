"""bench/routing.py's heads kind: each source's head is trained once per process and reused (``heads_for``), and
``headed`` composes compartments with their heads while the compartments themselves stay head-free for the other
kinds. The training and sampling at scale run in the benchmark itself."""

from __future__ import annotations

import numpy as np
import torch

from bench import routing
from bench.routing import headed, heads_for
from cdm.compartment import Compartment, build_unet, new_manifest
from cdm.config import ModelConfig, RouterConfig, TrainConfig
from cdm.data import SourceData, fingerprint
from cdm.routing import HeadsComposition

MODEL = ModelConfig(sample_size=8, block_out_channels=(8, 16), norm_num_groups=4)
ROUTER = RouterConfig(steps=2, batch_size=8, channels=(8, 16), eval_samples=8, threads=1)


def _source(seed: int, n: int = 12) -> SourceData:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 8, 8, 1), dtype=np.uint8)
    return SourceData(images, (np.arange(n) % 10).astype(np.int64), np.arange(n, dtype=np.int64) + 100 * seed)


def _compartment(name: str, data: SourceData) -> Compartment:
    torch.manual_seed(0)
    manifest = new_manifest(
        name,
        fingerprint=fingerprint(data),
        n_samples=len(data),
        class_counts=np.bincount(data.labels if data.labels is not None else [], minlength=10).tolist(),
        num_classes=10,
        model=MODEL,
        train=TrainConfig(),
    )
    return Compartment(build_unet(MODEL, 10).eval(), manifest)


def test_heads_for_trains_each_source_once_and_reuses_it() -> None:
    routing._HEADS.clear()
    parts = {"rand0": _source(0), "rand1": _source(1)}
    heads, secs = heads_for(MODEL, ROUTER, parts)
    assert [h.doc["source"] for h in heads] == ["rand0", "rand1"]
    assert [h.doc["steps"] for h in heads] == [2, 2]
    assert secs == sum(h.doc["train_seconds"] for h in heads) > 0
    again, secs_again = heads_for(MODEL, ROUTER, parts)
    assert all(a is b for a, b in zip(again, heads, strict=True)) and secs_again == secs
    # other data or another budget: a new head
    other, _ = heads_for(MODEL, ROUTER, {"rand0": _source(2)})
    longer, _ = heads_for(
        MODEL, RouterConfig(steps=3, batch_size=8, channels=(8, 16), threads=1), {"rand0": parts["rand0"]}
    )
    assert other[0] is not heads[0] and longer[0] is not heads[0] and longer[0].doc["steps"] == 3


def test_headed_composes_with_heads_and_leaves_the_compartments_head_free() -> None:
    routing._HEADS.clear()
    parts = {"rand0": _source(0), "rand1": _source(1)}
    comps = [_compartment(n, d) for n, d in parts.items()]
    heads, _ = heads_for(MODEL, ROUTER, parts)
    comp = headed(comps, list(parts), heads)
    assert isinstance(comp, HeadsComposition)
    assert all(c.head is None for c in comps)  # the learnt and density kinds compose the same objects
    x = torch.randn(3, 1, 8, 8)
    w = comp.router(x, torch.tensor([500, 500, 500]), torch.tensor([0, 1, 10]))
    assert w.shape == (3, 2) and bool(torch.isfinite(w).all())
