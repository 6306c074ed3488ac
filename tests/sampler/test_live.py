"""Hot swap against a real Redis registry: new epochs are swapped in; a bad artifact never replaces a good one."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import pytest
import redis

from cdm.artifacts import ArtifactsConfig, artifact_path, artifact_uri
from cdm.compartment import WEIGHTS
from cdm.config import ModelConfig, RouterConfig, TrainConfig
from cdm.errors import CdmError
from cdm.routing import save_router, train_router
from cdm.training import train_compartment
from registry.config import RedisConfig
from registry.keys import Keys
from registry.reader import RegistryClient
from registry.records import RouterRecord
from registry.writer import Registry
from sampler.live import LiveComposition
from sampler.loader import CompositionLoader, load_live_composition
from tests.daemon.daemon_harness import digit_sources

MODEL = ModelConfig(sample_size=8, block_out_channels=(16, 32))
TRAIN = TrainConfig(steps=2, batch_size=16, warmup_steps=1, checkpoint_every=0)
ROUTER = RouterConfig(steps=5, batch_size=32, channels=(16, 32), eval_samples=32)


def register(reg: Registry, root: Path, sources: dict, *, router_over: list[str] | None) -> None:
    ids = {}
    for name, data in sources.items():
        rec = reg.begin_training(name, f"fp-{name}", {"test": True})
        res = train_compartment(rec.compartment_id, data, model=MODEL, train=TRAIN, num_classes=10, progress=False)
        assert res.compartment is not None
        m = res.compartment.save(root / rec.compartment_id)
        reg.activate(
            rec.compartment_id,
            artifact_uri=artifact_uri(root / rec.compartment_id),
            sha256=m.sha256,
            prior=0.5,
            class_counts=m.class_counts,
            n_samples=m.n_samples,
            train_metrics={},
        )
        ids[name] = rec.compartment_id
    if router_over is None:
        return
    rr = train_router(
        {ids[n]: sources[n] for n in router_over}, model=MODEL, router=ROUTER, num_classes=10, progress=False
    )
    rdir = root / f"router-{'-'.join(router_over)}"
    rm = save_router(rr.router, rr.manifest, rdir)
    reg.set_router(
        RouterRecord(
            router_id=rdir.name,
            artifact_uri=artifact_uri(rdir),
            sha256=rm.sha256,
            compartment_ids=tuple(ids[n] for n in router_over),
            trained_at_epoch=reg.epoch(),
        )
    )


def test_swaps_new_epochs_and_keeps_the_last_good_composition(
    tmp_path: Path,
    redis_client: redis.Redis,
    redis_namespace: str,
    redis_db_url: str,
    request: pytest.FixtureRequest,
) -> None:
    keys = Keys(redis_namespace)
    reg = Registry(redis_client, keys)
    src = digit_sources(3)
    artifacts = ArtifactsConfig(url=tmp_path.as_uri())
    loader = CompositionLoader.from_config(artifacts, base_dir=tmp_path / "reader")
    live = LiveComposition(RegistryClient(redis_client, keys), loader)
    request.addfinalizer(live.stop)  # unpins the cached files
    assert live.refresh() is None, "nothing registered yet: nothing to serve"
    one_shot = functools.partial(
        load_live_composition, RedisConfig(namespace=redis_namespace), artifacts, base_dir=tmp_path / "cli"
    )
    with pytest.raises(CdmError, match="serves nothing yet"):
        one_shot(url=redis_db_url)
    register(reg, tmp_path, {"d0": src["d0"], "d1": src["d1"]}, router_over=["d0", "d1"])
    first = live.refresh()
    assert first is not None and sorted(first.sources) == ["d0", "d1"]
    _, out = live.sample(2, num_inference_steps=2)
    assert out.attribution.shape == (2, 2)
    # a compartment the router does not cover yet is pending, not served
    register(reg, tmp_path, {"d2": src["d2"]}, router_over=None)
    pending = live.refresh()
    assert pending is not None and pending.pending == ("d2@v1",) and sorted(pending.sources) == ["d0", "d1"]
    # tamper with an artifact, then register a router that needs it: the swap fails, the old one keeps serving
    d2_weights = artifact_path(reg.snapshot().by_source()["d2"].artifact_uri) / WEIGHTS
    raw = bytearray(d2_weights.read_bytes())
    raw[-1] ^= 0xFF
    d2_weights.write_bytes(bytes(raw))
    snap = reg.snapshot()
    rr = train_router(
        {c.compartment_id: src[c.source] for c in snap.compartments},
        model=MODEL,
        router=ROUTER,
        num_classes=10,
        progress=False,
    )
    rm = save_router(rr.router, rr.manifest, tmp_path / "router-all")
    reg.set_router(
        RouterRecord(
            router_id="all",
            artifact_uri=artifact_uri(tmp_path / "router-all"),
            sha256=rm.sha256,
            compartment_ids=snap.compartment_ids,
            trained_at_epoch=snap.epoch,
        )
    )
    kept = live.refresh()
    assert kept is pending, "a failed load must not replace the served composition"
    assert live.last_error is not None and "sha256" in live.last_error
    _, out = live.sample(2, num_inference_steps=2)  # still serving
    assert sorted(out.source_names) == ["d0", "d1"]
    # repair it: the next epoch loads fine
    d2_weights.write_bytes(bytes(raw[:-1] + bytes([raw[-1] ^ 0xFF])))
    reg.set_router(dataclasses.replace(reg.snapshot().router, router_id="all-again"))  # type: ignore[arg-type]
    fixed = live.refresh()
    assert fixed is not None and sorted(fixed.sources) == ["d0", "d1", "d2"] and live.last_error is None
    # the one-shot loader of `cdm sample --redis` sees the same composition
    denoiser, model = one_shot(url=redis_db_url)
    assert sorted(denoiser.source_names) == ["d0", "d1", "d2"] and model == MODEL


def test_the_routing_kind_decides_what_is_served(
    tmp_path: Path, redis_client: redis.Redis, redis_namespace: str, request: pytest.FixtureRequest
) -> None:
    from cdm.routing import ComposedDenoiser, DensityComposition

    keys = Keys(redis_namespace)
    reg = Registry(redis_client, keys)
    src = digit_sources(2)
    loader = CompositionLoader.from_config(ArtifactsConfig(url=tmp_path.as_uri()), base_dir=tmp_path / "reader")
    live = LiveComposition(RegistryClient(redis_client, keys), loader)
    request.addfinalizer(live.stop)  # unpins the cached files
    register(reg, tmp_path, {"d0": src["d0"], "d1": src["d1"]}, router_over=None)
    assert live.refresh() is None, "learnt routing (the default) serves nothing without a router"
    # density: served as soon as compartments are active, no router, priors from the records' n_samples
    epoch = reg.set_routing("density")
    density = live.refresh()
    assert density is not None and density.epoch == epoch and sorted(density.sources) == ["d0", "d1"]
    assert isinstance(density.denoiser, DensityComposition) and density.pending == ()
    n = {c.source: c.n_samples for c in reg.snapshot().compartments}
    priors = density.denoiser.priors / density.denoiser.priors.sum()
    assert priors.tolist() == [n[s] / sum(n.values()) for s in density.sources]
    _, out = live.sample(3, class_labels=[1, 2, 3], num_inference_steps=2, scheduler="ddpm")
    assert out.attribution.shape == (3, 2) and out.source_names == list(density.sources)
    # back to learnt with a router: one epoch, a ComposedDenoiser over what the router covers
    reg.set_routing("learnt")
    assert live.refresh() is None
    snap = reg.snapshot()
    rr = train_router(
        {c.compartment_id: src[c.source] for c in snap.compartments},
        model=MODEL,
        router=ROUTER,
        num_classes=10,
        progress=False,
    )
    rm = save_router(rr.router, rr.manifest, tmp_path / "router")
    reg.set_router(RouterRecord("r", artifact_uri(tmp_path / "router"), rm.sha256, snap.compartment_ids, snap.epoch))
    learnt = live.refresh()
    assert learnt is not None and isinstance(learnt.denoiser, ComposedDenoiser)
    _, out = live.sample(2, num_inference_steps=2)
    assert out.attribution.shape == (2, 2)


def test_library_and_registry_name_the_same_routing_kinds() -> None:
    from cdm.routing import ROUTING_KINDS
    from registry.records import RoutingKind

    assert set(ROUTING_KINDS) == {k.value for k in RoutingKind}
