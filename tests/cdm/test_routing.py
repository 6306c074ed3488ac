"""The routing interface: kinds, what each serves, build_composition, and CompartmentalPipeline over every kind
(guidance, per-image allowed sets, top-k, attribution, unknown arguments, save -> load -> same samples)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cdm.attribution import WEIGHTINGS, attribute, attribution_agreement, dominant_agreement
from cdm.compartment import Compartment, CompartmentHead, build_unet, new_manifest
from cdm.compose import ComposedDenoiser
from cdm.config import SampleConfig, TrainConfig
from cdm.errors import ConfigError
from cdm.pipeline import CompartmentalPipeline, make_scheduler
from cdm.routing import (
    ROUTING_KINDS,
    DensityComposition,
    HeadsComposition,
    PruneConfig,
    Router,
    RouterManifest,
    build_composition,
    check_kind,
    estimator_for,
    load_router,
    needs_router,
    save_router,
    serving,
)
from tests.cdm.conftest import TINY_MODEL

NAMES = ["a", "b", "c"]
COUNTS = [[5, 5, 0, 0, 0, 0, 0, 0, 0, 0], [0, 0, 4, 4, 4, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 6, 6, 6, 6, 6]]


def tiny_head(name: str) -> CompartmentHead:
    """An untrained head (the heads kind's network: the Router with one output), stored as a compartment holds it."""
    spec = {"source_names": [name], "sample_size": 8, "channels": [16, 32], "num_classes": 10}
    return CompartmentHead({"network": spec, "fingerprint": f"fp-{name}"}, Router(**spec).state_dict())


def tiny_compartments() -> list[Compartment]:
    torch.manual_seed(0)
    return [
        Compartment(
            build_unet(TINY_MODEL, 10).eval(),
            new_manifest(
                name,
                fingerprint=f"fp-{name}",
                n_samples=sum(counts),
                class_counts=counts,
                num_classes=10,
                model=TINY_MODEL,
                train=TrainConfig(),
            ),
            tiny_head(name),
        )
        for name, counts in zip(NAMES, COUNTS, strict=True)
    ]


def tiny_router() -> Router:
    torch.manual_seed(1)
    return Router(source_names=NAMES, sample_size=8, channels=(16, 32), num_classes=10).eval()


@pytest.fixture(scope="module")
def compartments() -> list[Compartment]:
    return tiny_compartments()


@pytest.fixture(scope="module")
def router() -> Router:
    return tiny_router()


def compose(kind: str, compartments, router, **kw):
    return build_composition(
        kind,
        compartments,
        NAMES,
        router=router if kind == "learnt" else None,
        n_samples=[sum(c) for c in COUNTS],
        class_counts=COUNTS,
        **kw,
    )


def sample(pipe: CompartmentalPipeline, **kw):
    base = dict(batch_size=4, num_inference_steps=3, generator=torch.Generator().manual_seed(0), progress=False)
    return pipe(**{**base, **kw})


# ------------------------------------------------------------------------------------------------------- kinds


def test_kinds_and_what_each_serves():
    assert ROUTING_KINDS == ("learnt", "density", "heads")
    assert check_kind("density") == "density" and check_kind("heads") == "heads"
    with pytest.raises(ConfigError, match="routing kind 'hydra' is not one of"):
        check_kind("hydra")
    assert needs_router("learnt") and not needs_router("density") and not needs_router("heads")
    active = ("a@v1", "b@v2", "c@v1")
    # learnt: only what a router covers; nothing without a router
    assert serving("learnt", active, None) == ((), active)
    assert serving("learnt", active, ("a@v1", "c@v1", "old@v1")) == (("a@v1", "c@v1"), ("b@v2",))
    # density: every active compartment, as soon as it is active; the router is irrelevant
    assert serving("density", active, None) == (active, ())
    assert serving("density", active, ("a@v1",)) == (active, ())
    # heads: the compartments that carry a head (``routed``: their ids)
    assert serving("heads", active, ("a@v1", "c@v1")) == (("a@v1", "c@v1"), ("b@v2",))


def test_build_composition(compartments, router):
    learnt = compose("learnt", compartments, router)
    assert isinstance(learnt, ComposedDenoiser) and learnt.kind == "learnt"
    density = compose("density", compartments, router)
    assert isinstance(density, DensityComposition) and density.kind == "density"
    # priors lambda_i = n_i / N from n_samples, P(i | c) from the class counts (zero: never evaluated on c)
    n = torch.tensor([10.0, 12.0, 30.0], dtype=torch.float64)
    torch.testing.assert_close(density.priors / density.priors.sum(), n / n.sum())
    assert density.class_priors is not None and density.class_priors[0, 5] == 0 and density.class_priors[2, 5] == 6
    assert density.estimator == "auto" and density.source_names == NAMES
    torch.testing.assert_close(density.alphas_cumprod, make_scheduler("ddpm", TINY_MODEL).alphas_cumprod.double())
    heads = compose("heads", compartments, router)
    assert isinstance(heads, HeadsComposition) and heads.kind == "heads" and heads.router.source_names == NAMES
    assert heads.router.class_priors is not None and heads.router.class_priors[0, 5] == 0
    # counts that do not cover every class are not class priors
    partial = build_composition("density", compartments, NAMES, class_counts=[[1], [1], [1]])
    assert isinstance(partial, DensityComposition) and partial.class_priors is None
    with pytest.raises(ConfigError, match="needs a trained router"):
        build_composition("learnt", compartments, NAMES)
    with pytest.raises(ConfigError, match="uses no router"):
        build_composition("density", compartments, NAMES, router=router)
    with pytest.raises(ConfigError, match="n_samples"):
        build_composition("density", compartments, NAMES, n_samples=[3, 0, 1])
    with pytest.raises(ConfigError, match="not one of"):
        build_composition("uniform", compartments, NAMES)
    with pytest.raises(ConfigError, match="no compartments"):
        build_composition("density", [], [])


def test_sde_dpm_is_the_stochastic_dpm_solver_and_pruning_is_the_density_kinds(compartments, router):
    # "sde-dpm": SDE-DPM-Solver++, the one multistep sampler the Itô estimator accepts; "dpm" gets the divergence one
    assert estimator_for(make_scheduler("sde-dpm", TINY_MODEL)) == "ito"
    assert estimator_for(make_scheduler("dpm", TINY_MODEL)) == "divergence"
    with pytest.raises(ConfigError, match="sde-dpm"):
        make_scheduler("euler", TINY_MODEL)
    prune = PruneConfig(threshold=0.01, patience=3)
    density = compose("density", compartments, router, prune=prune)
    assert isinstance(density, DensityComposition) and density.prune == prune
    plain = compose("density", compartments, router)
    assert isinstance(plain, DensityComposition) and plain.prune is None  # off by default
    with pytest.raises(ConfigError, match="top_k"):
        compose("learnt", compartments, router, prune=prune)


def test_sample_config_guidance_scale():
    assert SampleConfig().guidance_scale == 3.0  # measured by bench/routing.py (bench/RESULTS.md, 8.3)
    assert SampleConfig(scheduler="sde-dpm", guidance_scale=5).guidance_scale == 5.0
    with pytest.raises(ConfigError, match="guidance_scale"):
        SampleConfig(guidance_scale=-1)


# ---------------------------------------------------------------------------------------------------- pipeline


@pytest.mark.parametrize("scheduler", ["ddpm", "ddim", "dpm", "sde-dpm"])
@pytest.mark.parametrize("kind", ROUTING_KINDS)
def test_pipeline_samples_every_kind_with_every_scheduler(compartments, router, kind, scheduler):
    pipe = CompartmentalPipeline(compose(kind, compartments, router), make_scheduler(scheduler, TINY_MODEL))
    out = sample(pipe, class_labels=[0, 3, 5, 1], return_trajectory=True)
    assert out.images.shape == (4, 8, 8, 1) and out.images.dtype == np.uint8
    assert out.source_names == NAMES and out.trajectory is not None and out.trajectory.shape == (3, 4, 3)
    np.testing.assert_allclose(out.attribution.sum(1), 1.0, rtol=1e-5)
    if kind == "density":
        # class priors: only a has classes 0 and 1, b class 3, c class 5: a one-compartment mixture per image
        np.testing.assert_array_equal(out.trajectory, np.tile(np.eye(3)[[0, 1, 2, 0]], (3, 1, 1)))


@pytest.mark.parametrize("kind", ROUTING_KINDS)
def test_guidance_scale_one_is_unguided_and_other_scales_guide(compartments, router, kind):
    pipe = CompartmentalPipeline(compose(kind, compartments, router), make_scheduler("ddim", TINY_MODEL))
    labels = [0, 3, 5, 1]
    plain = sample(pipe, class_labels=labels, return_trajectory=True)
    one = sample(pipe, class_labels=labels, return_trajectory=True, guidance_scale=1.0)
    assert np.array_equal(plain.images, one.images) and np.array_equal(plain.trajectory, one.trajectory)
    guided = sample(pipe, class_labels=labels, return_trajectory=True, guidance_scale=4.0)
    assert not np.array_equal(plain.images, guided.images)
    np.testing.assert_allclose(guided.attribution.sum(1), 1.0, rtol=1e-5)
    # without labels guidance has nothing to guide towards: a no-op, exactly
    unlabelled = sample(pipe)
    assert np.array_equal(unlabelled.images, sample(pipe, guidance_scale=4.0).images)


@pytest.mark.parametrize("kind", ROUTING_KINDS)
def test_per_image_allowed_sets_and_sources(compartments, router, kind):
    pipe = CompartmentalPipeline(compose(kind, compartments, router), make_scheduler("ddim", TINY_MODEL))
    mask = torch.tensor([[True, False, False], [False, True, True], [True, True, True], [False, False, True]])
    out = sample(pipe, allowed=mask, return_trajectory=True)
    assert out.trajectory is not None and np.all(out.trajectory[:, ~mask.numpy()] == 0)
    np.testing.assert_allclose(out.attribution[0], [1, 0, 0])
    np.testing.assert_allclose(out.attribution[3], [0, 0, 1])
    only_b = sample(pipe, sources=["b"])
    np.testing.assert_allclose(only_b.attribution, np.tile([0.0, 1.0, 0.0], (4, 1)))
    with pytest.raises(ConfigError, match="either sources"):
        sample(pipe, sources=["a"], allowed=mask)
    with pytest.raises(ConfigError, match="unknown source"):
        sample(pipe, sources=["nope"])


def test_the_pipeline_refuses_what_it_does_not_know(compartments, router):
    learnt = CompartmentalPipeline(compose("learnt", compartments, router), make_scheduler("ddim", TINY_MODEL))
    density = CompartmentalPipeline(compose("density", compartments, router), make_scheduler("ddim", TINY_MODEL))
    with pytest.raises(TypeError, match="guidance_scal"):
        sample(learnt, guidance_scal=2.0)  # a typo must not be swallowed
    with pytest.raises(TypeError, match="cfg"):
        sample(learnt, cfg=2.0)
    with pytest.raises(ConfigError, match="top_k must be >= 1, got 0"):
        sample(learnt, top_k=0)
    with pytest.raises(ConfigError, match="top_k"):
        sample(density, top_k=1)
    with pytest.raises(ConfigError, match="guidance_scale"):
        sample(learnt, class_labels=[1], guidance_scale=-1.0)
    with pytest.raises(ConfigError, match="batch_size"):
        sample(learnt, batch_size=0)
    with pytest.raises(ConfigError, match="weighting"):
        sample(learnt, attribution_weighting="last")
    from diffusers import EulerDiscreteScheduler

    euler = EulerDiscreteScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    with pytest.raises(ConfigError, match="EulerDiscreteScheduler"):
        sample(density, scheduler=euler)


def test_top_k_through_the_pipeline(compartments, router):
    pipe = CompartmentalPipeline(compose("learnt", compartments, router), make_scheduler("ddim", TINY_MODEL))
    top1 = sample(pipe, top_k=1, return_trajectory=True)
    assert top1.trajectory is not None and np.all((top1.trajectory > 0).sum(-1) == 1)
    per_row = sample(pipe, top_k=torch.tensor([1, 2, 3, 1]), return_trajectory=True)
    assert per_row.trajectory is not None
    assert np.array_equal((per_row.trajectory > 0).sum(-1).max(0), [1, 2, 3, 1])


# ------------------------------------------------------------------------------------------------- attribution


def test_attribution_weightings():
    traj = np.array([[[0.5, 0.5]], [[0.9, 0.1]], [[1.0, 0.0]]])  # 3 steps, 1 row, 2 sources
    abar = np.array([0.01, 0.5, 0.99])
    np.testing.assert_allclose(attribute(traj), traj.mean(0))
    np.testing.assert_allclose(attribute(traj, abar, "mean"), traj.mean(0))
    np.testing.assert_allclose(
        attribute(traj, abar, "alpha_bar"), [[(0.005 + 0.45 + 0.99) / 1.5, (0.005 + 0.05) / 1.5]]
    )
    snr = abar / (1 - abar)
    np.testing.assert_allclose(attribute(traj, abar, "snr"), (snr[:, None, None] * traj).sum(0) / snr.sum())
    # low-noise weightings lean away from the high-noise prior-like weights
    assert attribute(traj, abar, "snr")[0, 0] > attribute(traj, abar, "alpha_bar")[0, 0] > attribute(traj)[0, 0]
    assert dominant_agreement(np.array([[0.6, 0.4], [0.3, 0.7]]), np.array([0, 0])) == 0.5
    agreement = attribution_agreement(np.concatenate([traj, traj[:, :, ::-1]], 1), abar, np.array([0, 1]))
    assert set(agreement) == set(WEIGHTINGS) and all(v == 1.0 for v in agreement.values())
    with pytest.raises(ConfigError, match="needs the alpha_bar"):
        attribute(traj, None, "snr")
    with pytest.raises(ConfigError, match="steps"):
        attribute(traj, abar[:2], "snr")


def test_pipeline_attribution_weighting(compartments, router):
    pipe = CompartmentalPipeline(compose("learnt", compartments, router), make_scheduler("ddim", TINY_MODEL))
    mean = sample(pipe, return_trajectory=True)
    low = sample(pipe, return_trajectory=True, attribution_weighting="alpha_bar")
    assert mean.trajectory is not None and mean.alphas_cumprod is not None and mean.timesteps is not None
    np.testing.assert_allclose(mean.attribution, mean.trajectory.mean(0), rtol=1e-6)
    np.testing.assert_allclose(low.attribution, attribute(mean.trajectory, mean.alphas_cumprod, "alpha_bar"), rtol=1e-6)
    abar = make_scheduler("ddim", TINY_MODEL).alphas_cumprod.double().numpy()
    np.testing.assert_allclose(mean.alphas_cumprod, abar[mean.timesteps])


# ------------------------------------------------------------------------------------------ save -> load -> same


@pytest.mark.parametrize("kind", ROUTING_KINDS)
def test_saved_and_reloaded_compositions_sample_the_same(tmp_path: Path, kind: str):
    comps, router = tiny_compartments(), tiny_router()
    loaded = []
    for c in comps:
        manifest = c.save(tmp_path / c.name)
        loaded.append(Compartment.load(tmp_path / c.name, expected_sha256=manifest.sha256))
    rm = RouterManifest(
        source_names=NAMES, fingerprints={}, n_samples={}, num_classes=10, model={}, router={}, report={}
    )
    save_router(router, rm, tmp_path / "router")
    router_again, _ = load_router(tmp_path / "router")
    before = CompartmentalPipeline(compose(kind, comps, router), make_scheduler("ddpm", TINY_MODEL))
    after = CompartmentalPipeline(compose(kind, loaded, router_again), make_scheduler("ddpm", TINY_MODEL))
    for kw in ({}, {"class_labels": [0, 3, 5, 1], "guidance_scale": 2.0}):
        a, b = sample(before, **kw), sample(after, **kw)
        assert np.array_equal(a.images, b.images) and np.array_equal(a.attribution, b.attribution)
