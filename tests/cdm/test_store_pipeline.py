"""The offline store end to end: train two sources, sample with every scheduler, forget exactly."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from cdm.artifacts import sha256_file
from cdm.compartment import WEIGHTS
from cdm.errors import ConfigError, StoreError
from cdm.pipeline import CompartmentalPipeline, make_scheduler
from cdm.store import LocalStore
from tests.cdm.conftest import TINY_MODEL, TINY_ROUTER, TINY_TRAIN


@pytest.fixture()
def store(tmp_path: Path, two_class_disjoint_sources) -> LocalStore:
    s = LocalStore(tmp_path / "store", model=TINY_MODEL)
    for name, data in two_class_disjoint_sources.items():
        s.stage_data(name, data)
        s.train_compartment(name, TINY_TRAIN, progress=False)
    s.train_router(TINY_ROUTER, progress=False)
    return s


def test_router_training_records_priors_in_manifests(store: LocalStore, two_class_disjoint_sources) -> None:
    n = {k: len(v) for k, v in two_class_disjoint_sources.items()}
    for name in store.sources():
        prior = store.manifest(name).prior
        assert prior is not None
        # the router holds out ~10% per source, so priors are measured on the training pool
        assert abs(prior - n[name] / sum(n.values())) < 0.02
    store.load_compartment("low")  # sha256s still verify after the metadata update


@pytest.mark.parametrize("scheduler", ["ddpm", "ddim", "dpm"])
def test_sampling_with_each_scheduler(store: LocalStore, scheduler: str) -> None:
    pipe = CompartmentalPipeline(store.composed(), make_scheduler(scheduler, store.model))
    out = pipe(
        batch_size=6,
        num_inference_steps=4,
        generator=torch.Generator().manual_seed(0),
        return_trajectory=True,
        progress=False,
    )
    assert out.images.shape == (6, 8, 8, 1) and out.images.dtype == np.uint8
    assert out.source_names == ["high", "low"]
    assert out.attribution.shape == (6, 2)
    np.testing.assert_allclose(out.attribution.sum(1), 1.0, rtol=1e-5)
    assert out.trajectory is not None and out.trajectory.shape == (4, 6, 2)


def test_subset_labels_top_k_and_determinism(store: LocalStore) -> None:
    pipe = store.pipeline(scheduler="ddim")
    kw = dict(batch_size=4, num_inference_steps=3, progress=False)
    a = pipe(generator=torch.Generator().manual_seed(1), sources=["low"], class_labels=[1], **kw)
    assert np.all(a.attribution[:, 0] == 0) and np.allclose(a.attribution[:, 1], 1)
    b = pipe(generator=torch.Generator().manual_seed(1), sources=["low"], class_labels=[1], **kw)
    np.testing.assert_array_equal(a.images, b.images)
    top1 = pipe(generator=torch.Generator().manual_seed(2), top_k=1, return_trajectory=True, **kw)
    assert top1.trajectory is not None
    assert np.all((top1.trajectory > 0).sum(-1) == 1), "top-1 must route each sample to one compartment per step"
    with pytest.raises(ConfigError, match="out of range"):
        pipe(class_labels=[10], **kw)
    with pytest.raises(ConfigError, match="unknown source"):
        pipe(sources=["nope"], **kw)


def test_forget_source_deletes_everything_and_leaves_others_untouched(store: LocalStore) -> None:
    high_weights = sha256_file(store.compartment_dir("high") / WEIGHTS)
    receipt = store.forget_source("low", TINY_ROUTER, progress=False)
    assert store.sources() == ["high"]
    assert not store.compartment_dir("low").exists() and not store.data_path("low").exists()
    leftovers = [
        p
        for p in store.root.rglob("*")
        if "low" in p.relative_to(store.root).as_posix() and p.parent.name != "receipts"
    ]
    assert leftovers == [], f"forgetting left derived artifacts behind: {leftovers}"
    assert receipt.untouched == {"high@v1": high_weights}
    assert receipt.outcome == "forgotten" and receipt.retired == ("low@v1",)
    assert sha256_file(store.compartment_dir("high") / WEIGHTS) == high_weights
    assert receipt.router_sha256_after != receipt.router_sha256_before
    rm = store.router_manifest()
    assert rm is not None and rm.source_names == ["high@v1"]
    assert list(store.root.glob("receipts/*-low.json"))
    out = store.pipeline().__call__(batch_size=2, num_inference_steps=2, progress=False)
    assert out.source_names == ["high"]


def test_forget_samples_retrains_only_that_compartment(store: LocalStore) -> None:
    high_weights = sha256_file(store.compartment_dir("high") / WEIGHTS)
    low = store.load_data("low")
    ids = low.ids[:5].tolist()
    receipt = store.forget_samples("low", ids, TINY_TRAIN, TINY_ROUTER, progress=False)
    assert receipt.n_samples_removed == 5
    assert len(store.load_data("low")) == len(low) - 5
    assert not np.isin(store.load_data("low").ids, ids).any()
    assert store.manifest("low").fingerprint == receipt.new_fingerprint != receipt.fingerprint
    assert sha256_file(store.compartment_dir("high") / WEIGHTS) == high_weights
    assert receipt.untouched == {"high@v1": high_weights} and receipt.new_compartment == "low@v2"
    # no sample matches: a no-op with a receipt saying so (the live compartment and its data stay)
    before = store.manifest("low")
    none = store.forget_samples("low", [10**9], TINY_TRAIN, TINY_ROUTER, progress=False)
    assert none.outcome == "no-match" and none.n_samples_removed == 0 and none.deleted_files == ()
    assert none.unmatched_ids == (10**9,) and store.manifest("low") == before and store.data_path("low").exists()


def test_store_refuses_other_architecture_and_stale_router(store: LocalStore, two_class_disjoint_sources) -> None:
    with pytest.raises(StoreError, match="share an architecture"):
        LocalStore(store.root, model=dataclasses.replace(TINY_MODEL, sample_size=16))
    store.stage_data("extra", two_class_disjoint_sources["low"])
    store.train_compartment("extra", dataclasses.replace(TINY_TRAIN, steps=1), progress=False)
    with pytest.raises(StoreError, match="retrain"):
        store.load_router()


@pytest.mark.parametrize("scheduler", ["ddpm", "ddim", "dpm"])
def test_samplers_stay_in_range_with_the_cosine_schedule(store: LocalStore, scheduler: str) -> None:
    """A regression test: DPM-Solver++ from t = 999 of squaredcos_cap_v2 divided by alpha ~ 0 and exploded."""
    s = make_scheduler(scheduler, store.model)
    s.set_timesteps(10)
    comp = store.load_compartment("low")
    g = torch.Generator().manual_seed(0)
    x = torch.randn((4, 1, 8, 8), generator=g) * s.init_noise_sigma
    with torch.no_grad():
        for t in s.timesteps:
            x = s.step(comp(s.scale_model_input(x, t), t.expand(4), None), t, x, generator=g).prev_sample
    assert x.abs().max() <= 1.05, f"{scheduler} left the data range: max |x| = {x.abs().max():.2f}"
