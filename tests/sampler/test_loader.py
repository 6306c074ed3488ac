"""The loader: every artifact through the verified cache, compartments cached by (id, sha256), nothing loaded from
outside the artifact store or the cache (issue 8 item 11), today's file:// records still served."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import pytest
import redis
import torch

from cdm.artifacts import MANIFEST, DirectoryStore, upload_directory
from cdm.compartment import WEIGHTS
from cdm.errors import IntegrityError, StoreError
from registry.keys import Keys
from registry.reader import RegistryClient
from registry.records import RegistrySnapshot
from registry.writer import Registry
from sampler.live import LiveComposition
from sampler.loader import MAX_JSON_BYTES, CompositionLoader
from sampler.metrics import SamplerMetrics
from tests.sampler.conftest import metric
from tests.sampler.publish import (
    publish_compartment,
    publish_router,
    registry_files,
    save_tiny_compartment,
)


def eps(comp: object) -> torch.Tensor:
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return comp(x, torch.tensor([10, 500]), torch.tensor([1, 2]))  # type: ignore[operator]


def test_compartments_are_cached_by_id_and_sha256(
    tmp_path: Path,
    redis_client: redis.Redis,
    keys: Keys,
    reg: Registry,
    store: DirectoryStore,
    loader: CompositionLoader,
    metrics: SamplerMetrics,
) -> None:
    writer = tmp_path / "writer"
    live = LiveComposition(RegistryClient(redis_client, keys), loader)
    d0 = publish_compartment(reg, redis_client, keys, store, writer, "d0", seed=0)
    publish_router(reg, store, writer, "r1", [d0.compartment_id])
    first = live.refresh()
    assert first is not None and loader.loads == {"compartment": 1, "router": 1}
    # 1. a new epoch with the same compartment record: not loaded again
    publish_router(reg, store, writer, "r2", [d0.compartment_id])
    second = live.refresh()
    assert second is not None and second.epoch > first.epoch and loader.loads == {"compartment": 1, "router": 2}
    assert second.denoiser.compartments[0] is first.denoiser.compartments[0]
    # 2. the same id now records other bytes (re-uploaded elsewhere): loaded again, and served, by its sha256
    other = save_tiny_compartment(writer / "other", "d0@v1", seed=5)
    files = registry_files(upload_directory(store, writer / "other", "compartments/d0@v1-other"))
    changed = dataclasses.replace(reg.get("d0@v1"), files=files, sha256=other.manifest.sha256)
    redis_client.hset(keys.compartment("d0@v1"), mapping={"files": json.dumps({r: dataclasses.asdict(f) for r, f in
                      files.items()}), "sha256": json.dumps(changed.sha256)})  # fmt: skip
    redis_client.incr(keys.epoch)
    third = live.refresh()
    assert third is not None and third.compartment_ids == ("d0@v1",)
    assert loader.loads == {"compartment": 2, "router": 2}
    assert metric(metrics, "cdm_artifact_loads_total", kind="compartment") == 2
    torch.testing.assert_close(eps(third.denoiser.compartments[0]), eps(other), rtol=0, atol=0)
    assert not torch.equal(eps(third.denoiser.compartments[0]), eps(first.denoiser.compartments[0]))
    assert len(loader.loaded) == 1, "the replaced bytes are released once nothing serves them"
    live.stop()


def test_records_with_only_a_file_uri_are_read_from_the_local_store(
    tmp_path: Path,
    redis_client: redis.Redis,
    keys: Keys,
    reg: Registry,
    store: DirectoryStore,
    loader: CompositionLoader,
) -> None:
    """Records written before ``files`` existed (artifact_uri + sha256) load from the store, through the cache."""
    writer = store.root  # today's daemon saves its artifacts in the directory that is its store
    d0 = publish_compartment(reg, redis_client, keys, store, writer, "d0", seed=0, with_files=False)
    router = publish_router(reg, store, writer, "r1", [d0.compartment_id], with_files=False)
    assert not d0.files and not router.files and d0.artifact_uri.startswith("file://")
    comp = loader.build(reg.snapshot())
    assert comp is not None and comp.sources == ("d0",)
    torch.testing.assert_close(
        eps(comp.denoiser.compartments[0]), eps(save_tiny_compartment(tmp_path / "again", "d0@v1", seed=0))
    )
    # a tampered weights file is refused before it is decoded
    weights = store.root / "compartments" / "d0@v1" / WEIGHTS
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0xFF
    weights.write_bytes(bytes(raw))
    loader.close()
    loader.cache.discard([d0.sha256[WEIGHTS]])
    again = CompositionLoader(loader.cache)
    with pytest.raises(IntegrityError, match="does not match the recorded"):
        again.build(reg.snapshot())
    again.close()


def test_paths_outside_the_artifact_store_are_refused(
    tmp_path: Path,
    redis_client: redis.Redis,
    keys: Keys,
    reg: Registry,
    store: DirectoryStore,
    loader: CompositionLoader,
) -> None:
    """Whoever can write to Redis cannot point the loader at another readable directory."""
    elsewhere = DirectoryStore(tmp_path / "elsewhere")
    d0 = publish_compartment(reg, redis_client, keys, elsewhere, tmp_path / "writer", "d0", seed=0, with_files=False)
    publish_router(reg, elsewhere, tmp_path / "writer", "r1", [d0.compartment_id], with_files=False)
    snap = reg.snapshot()
    # 1. today's record naming a directory outside the store
    with pytest.raises(StoreError, match="outside the artifact store"):
        loader.build(snap)
    # 2. a files map whose URIs lie outside the store
    files = registry_files(upload_directory(elsewhere, tmp_path / "writer" / "compartments" / "d0@v1", "x/d0"))
    outside = dataclasses.replace(snap.compartments[0], files=files)
    router = publish_router(reg, store, tmp_path / "writer", "r2", [d0.compartment_id])
    with pytest.raises(StoreError, match="outside this store"):
        loader.build(RegistrySnapshot(snap.epoch, (outside,), router))
    # 3. a link inside the store that leads out of it
    inside = store.root / "compartments" / "linked"
    inside.mkdir(parents=True)
    for rel in ("unet", MANIFEST):
        os.symlink(tmp_path / "writer" / "compartments" / "d0@v1" / rel, inside / rel)
    linked = dataclasses.replace(snap.compartments[0], artifact_uri=inside.as_uri())
    with pytest.raises(StoreError, match="outside the store root"):
        loader.build(RegistrySnapshot(snap.epoch, (linked,), router))
    assert loader.loads == {"router": 1} and not loader.loaded  # no compartment was decoded


def test_oversized_json_and_self_contradicting_records_are_refused(
    tmp_path: Path,
    redis_client: redis.Redis,
    keys: Keys,
    reg: Registry,
    store: DirectoryStore,
    loader: CompositionLoader,
) -> None:
    d0 = publish_compartment(reg, redis_client, keys, store, tmp_path / "writer", "d0", seed=0)
    router = publish_router(reg, store, tmp_path / "writer", "r1", [d0.compartment_id])
    big = dict(d0.files)
    big[MANIFEST] = dataclasses.replace(big[MANIFEST], size=MAX_JSON_BYTES + 1)
    with pytest.raises(StoreError, match="recorded larger than"):
        loader.build(RegistrySnapshot(1, (dataclasses.replace(d0, files=big),), router))
    contradicting = dataclasses.replace(d0, sha256={**d0.sha256, WEIGHTS: "0" * 64})
    with pytest.raises(IntegrityError, match="contradicts itself"):
        loader.build(RegistrySnapshot(1, (contradicting,), router))
    assert not loader.loaded


def test_the_heads_kind_serves_the_compartments_that_carry_a_head(
    tmp_path: Path,
    redis_client: redis.Redis,
    keys: Keys,
    reg: Registry,
    store: DirectoryStore,
    loader: CompositionLoader,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from cdm.compartment import HEAD_CONFIG, HEAD_WEIGHTS, CompartmentHead
    from cdm.routing import HeadsComposition, Router

    writer = tmp_path / "writer"
    headed = save_tiny_compartment(writer / "scratch", "d0@v1", seed=0)
    spec = {"source_names": ["d0"], "sample_size": 8, "channels": [8, 16], "num_classes": 10}
    headed.head = CompartmentHead(
        {"network": spec, "fingerprint": headed.manifest.fingerprint}, Router(**spec).state_dict()
    )
    d0 = publish_compartment(reg, redis_client, keys, store, writer, "d0", seed=0, compartment=headed)
    d1 = publish_compartment(reg, redis_client, keys, store, writer, "d1", seed=1)  # trained under another kind
    assert {HEAD_CONFIG, HEAD_WEIGHTS} <= set(d0.files) and HEAD_CONFIG not in d1.files
    reg.set_routing("heads")
    live = LiveComposition(RegistryClient(redis_client, keys), loader)
    with caplog.at_level(logging.WARNING, logger="sampler.loader"):
        comp = live.refresh()
        assert loader.build(reg.snapshot()) is not None  # a second check: nothing new to tell
    assert comp is not None and comp.routing == "heads" and isinstance(comp.denoiser, HeadsComposition)
    assert comp.compartment_ids == (d0.compartment_id,) and comp.pending == (d1.compartment_id,)
    told = [r.getMessage() for r in caplog.records if r.name == "sampler.loader"]
    assert len(told) == 1 and d1.compartment_id in told[0] and d0.compartment_id not in told[0], told
    assert '[router] kind = "heads"' in told[0] and "back" in told[0]
    assert loader.loads == {"compartment": 1}, "no router, and the compartment without a head is not loaded"
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(comp.denoiser.compose(x, torch.tensor([10, 500]), None).weights, torch.ones(2, 1))
    live.stop()
