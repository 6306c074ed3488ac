"""Issue 8 item 8: the watcher survives bad snapshots, readiness means "alive and current", and a failed build
never serves a compartment the registry removed (nor one a tombstone forgets)."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from cdm.artifacts import ArtifactsConfig, DirectoryStore
from cdm.compartment import WEIGHTS
from cdm.errors import CdmError
from registry.config import RedisConfig
from registry.keys import Keys
from registry.reader import RegistryClient
from registry.writer import Registry
from sampler.live import LiveComposition
from sampler.loader import CompositionLoader, load_live_composition
from sampler.metrics import SamplerMetrics
from tests.sampler.conftest import metric, wait_until
from tests.sampler.publish import publish_compartment, publish_router, write_tombstone


@pytest.fixture
def live(
    redis_client: redis.Redis, keys: Keys, loader: CompositionLoader, metrics: SamplerMetrics
) -> Iterator[LiveComposition]:
    """A live composition checked by hand (``refresh``); tests that need the watcher start it."""
    live = LiveComposition(RegistryClient(redis_client, keys), loader, metrics=metrics, resync_s=0.2)
    yield live
    live.stop()


def test_a_malformed_record_neither_stops_the_watcher_nor_passes_readiness(
    tmp_path: Path,
    redis_client: redis.Redis,
    keys: Keys,
    reg: Registry,
    store: DirectoryStore,
    live: LiveComposition,
    metrics: SamplerMetrics,
    caplog: pytest.LogCaptureFixture,
) -> None:
    d0 = publish_compartment(reg, redis_client, keys, store, tmp_path / "writer", "d0", seed=0)
    d1 = publish_compartment(reg, redis_client, keys, store, tmp_path / "writer", "d1", seed=1)
    publish_router(reg, store, tmp_path / "writer", "r1", [d0.compartment_id, d1.compartment_id])
    live.start()
    wait_until("the first composition", lambda: live.readiness()[0])
    first = live.current()
    assert first is not None and first.sources == ("d0", "d1")
    # 1. one record of the composition no longer decodes, and the epoch moves
    redis_client.hset(keys.compartment(d1.compartment_id), "class_counts", "{not json")
    epoch = int(redis_client.incr(keys.epoch))
    wait_until("the watcher to read the new epoch", lambda: live.status().registry_epoch == epoch)
    errors = "cdm_registry_watch_errors_total"
    wait_until("a second failed check", lambda: metric(metrics, errors, reason="record") >= 2)
    assert live.watcher_alive
    ready, why = live.readiness()
    assert not ready and f"registry is at epoch {epoch}" in why and "CompartmentRecord.class_counts" in why
    assert live.status().served_epoch == first.epoch and live.current() is first  # nothing it serves was removed
    logged = [r for r in caplog.records if "CompartmentRecord.class_counts" in r.getMessage()]
    assert len(logged) == 1 and f"epoch {epoch} not applied (record)" in logged[0].getMessage()  # once, not per check
    # 2. meanwhile d0 leaves the active set: withheld at once, though the snapshot still does not decode
    redis_client.srem(keys.active, d0.compartment_id)
    epoch = int(redis_client.incr(keys.epoch))
    wait_until("d0 to be withheld", lambda: (c := live.current()) is not None and c.sources == ("d1",))
    degraded = live.current()
    assert degraded is not None and degraded.epoch == epoch and "d0@v1" in degraded.degraded
    assert metric(metrics, "cdm_composition_degraded") == 1 and not live.readiness()[0]
    # 3. repaired: the registry's full composition again, ready
    redis_client.hset(keys.compartment(d1.compartment_id), "class_counts", json.dumps([1] * 10))
    redis_client.sadd(keys.active, d0.compartment_id)
    epoch = int(redis_client.incr(keys.epoch))
    wait_until("ready again", lambda: live.readiness()[0])
    again = live.current()
    assert again is not None and again.sources == ("d0", "d1") and again.epoch == epoch and not again.degraded
    assert metric(metrics, "cdm_composition_degraded") == 0 and live.last_error is None and live.watcher_alive
    assert metric(metrics, "cdm_registry_epoch_seen") == epoch == metric(metrics, "cdm_registry_epoch")


def test_a_stale_epoch_or_a_stale_check_is_not_ready(
    tmp_path: Path,
    redis_client: redis.Redis,
    keys: Keys,
    reg: Registry,
    store: DirectoryStore,
    loader: CompositionLoader,
    metrics: SamplerMetrics,
) -> None:
    now = [1_000.0]
    live = LiveComposition(
        RegistryClient(redis_client, keys), loader, metrics=metrics, resync_s=60.0, clock=lambda: now[0]
    )
    assert live.readiness() == (False, "the registry watcher is not running")
    d0 = publish_compartment(reg, redis_client, keys, store, tmp_path / "writer", "d0", seed=0)
    publish_router(reg, store, tmp_path / "writer", "r1", [d0.compartment_id])
    live.start()
    try:
        wait_until("the first composition", lambda: live.readiness()[0])
        served = live.status().served_epoch
        # 1. the next epoch's router is missing from the store: still serving the last one, but not ready
        publish_router(reg, store, tmp_path / "writer", "r2", [d0.compartment_id], missing_weights=True)
        store.delete("routers/r1/diffusion_pytorch_model.safetensors")  # the served one is in memory: unaffected
        wait_until("the failed swap", lambda: live.status().registry_epoch == reg.epoch())
        wait_until("the failure to be counted", lambda: metric(metrics, "cdm_hotswap_failures_total") >= 1)
        ready, why = live.readiness()
        assert not ready and f"serving epoch {served} while the registry is at epoch {reg.epoch()}" in why
        assert "ObjectNotFoundError" in why
        assert metric(metrics, "cdm_registry_watch_errors_total", reason="missing") >= 1
        comp = live.current()
        assert comp is not None and comp.epoch == served and live.watcher_alive
        _, out = live.sample(1, num_inference_steps=2)  # still serving
        assert out.source_names == ["d0"]
        # 2. a good epoch: current and ready again
        publish_router(reg, store, tmp_path / "writer", "r3", [d0.compartment_id])
        wait_until("ready again", lambda: live.readiness()[0])
        assert metric(metrics, "cdm_registry_watch_last_check_timestamp_seconds") == now[0]
        # 3. no successful check for longer than stale_after_s (3 x 60 + 10 s): not ready
        now[0] += 191
        ready, why = live.readiness()
        assert not ready and "no successful registry check for 191s" in why
    finally:
        live.stop()
    assert live.readiness() == (False, "the registry watcher is not running")


def test_a_failed_build_after_a_forget_never_serves_the_forgotten_compartment(
    tmp_path: Path,
    redis_client: redis.Redis,
    keys: Keys,
    reg: Registry,
    store: DirectoryStore,
    live: LiveComposition,
    metrics: SamplerMetrics,
) -> None:
    writer = tmp_path / "writer"
    d0 = publish_compartment(reg, redis_client, keys, store, writer, "d0", seed=0)
    d1 = publish_compartment(reg, redis_client, keys, store, writer, "d1", seed=1)
    publish_router(reg, store, writer, "r1", [d0.compartment_id, d1.compartment_id])
    first = live.refresh()
    assert first is not None and first.sources == ("d0", "d1")
    # 1. d1 is forgotten and the new router fails to load: d0 alone keeps serving, never d1
    reg.forget_source("d1")
    publish_router(reg, store, writer, "r2", [d0.compartment_id], missing_weights=True)
    comp = live.refresh()
    assert comp is not None and comp.sources == ("d0",) and comp.compartment_ids == ("d0@v1",)
    assert comp.epoch == reg.epoch() and "d1@v1" in comp.degraded
    _, out = live.sample(2, num_inference_steps=2)
    assert out.source_names == ["d0"] and out.attribution.shape == (2, 1)
    assert not live.status().current and metric(metrics, "cdm_hotswap_failures_total") == 1
    # 2. a tombstone lands while the build still fails: the tombstoned source is withheld too
    d2 = publish_compartment(reg, redis_client, keys, store, writer, "d2", seed=2)
    publish_router(reg, store, writer, "r3", [d0.compartment_id, d2.compartment_id])
    assert live.refresh() is not None and live.current().sources == ("d0", "d2")  # type: ignore[union-attr]
    write_tombstone(redis_client, keys, "d2", [])
    publish_router(reg, store, writer, "r4", [d0.compartment_id, d2.compartment_id], missing_weights=True)
    comp = live.refresh()
    assert comp is not None and comp.sources == ("d0",), "a tombstoned source is never served"
    # 3. every served compartment removed and the build still failing: nothing is served
    reg.forget_source("d0")
    d3 = publish_compartment(reg, redis_client, keys, store, writer, "d3", seed=3)
    publish_router(reg, store, writer, "r5", [d3.compartment_id], missing_weights=True)
    assert live.refresh() is None
    with pytest.raises(CdmError, match="no composition is loaded"):
        live.sample(1)


def test_density_routing_fails_closed_too(
    tmp_path: Path,
    redis_client: redis.Redis,
    keys: Keys,
    reg: Registry,
    store: DirectoryStore,
    live: LiveComposition,
) -> None:
    """No router to keep: the compartments still active keep serving under the same routing kind."""
    writer = tmp_path / "writer"
    reg.set_routing("density")
    d0 = publish_compartment(reg, redis_client, keys, store, writer, "d0", seed=0)
    publish_compartment(reg, redis_client, keys, store, writer, "d1", seed=1)
    first = live.refresh()
    assert first is not None and first.sources == ("d0", "d1") and first.routing == "density" and first.router is None
    reg.forget_source("d1")
    publish_compartment(reg, redis_client, keys, store, writer, "d2", seed=2, missing_weights=True)
    comp = live.refresh()
    assert comp is not None and comp.sources == ("d0",) and comp.routing == "density" and "d1@v1" in comp.degraded
    assert comp.denoiser.compartments[0] is first.denoiser.compartments[0] and comp.records == (d0,)
    _, out = live.sample(1, num_inference_steps=2)
    assert out.source_names == ["d0"]


def test_tombstoned_compartments_are_never_loaded_and_their_cached_files_are_purged(
    tmp_path: Path,
    redis_client: redis.Redis,
    keys: Keys,
    reg: Registry,
    store: DirectoryStore,
    artifacts: ArtifactsConfig,
    live: LiveComposition,
    loader: CompositionLoader,
    metrics: SamplerMetrics,
    redis_namespace: str,
    redis_db_url: str,
) -> None:
    writer = tmp_path / "writer"
    d0 = publish_compartment(reg, redis_client, keys, store, writer, "d0", seed=0)
    d1 = publish_compartment(reg, redis_client, keys, store, writer, "d1", seed=1)
    publish_router(reg, store, writer, "r1", [d0.compartment_id, d1.compartment_id])
    assert live.refresh().sources == ("d0", "d1")  # type: ignore[union-attr]
    blobs = loader.cache.root / "blobs"
    d1_files = {rel: f.sha256 for rel, f in d1.files.items()}
    assert set(d1_files.values()) <= {p.name for p in blobs.iterdir()}
    # 1. the tombstone alone (d1 still active, same epoch): d1 is withheld and its own files leave the cache
    write_tombstone(redis_client, keys, "d1", sorted(d1_files.values()))
    comp = live.refresh()
    assert comp is not None and comp.sources == ("d0",)
    assert any(r.startswith("d1@v1: its source 'd1' was forgotten") for r in live.status().refused)
    cached = {p.name for p in blobs.iterdir()}
    assert d1_files[WEIGHTS] not in cached and d1_files["manifest.json"] not in cached
    shared = d1_files["unet/config.json"]
    assert shared == d0.files["unet/config.json"].sha256 and shared in cached, "d0 still uses the same config bytes"
    assert metric(metrics, "cdm_artifact_blobs_purged_total") == 2 and live.status().pending_purge == ()
    # 2. retired (the forget transaction rewrites the tombstone), a new router: still d0 alone; nothing loaded twice
    reg.forget_source("d1", files_sha256=sorted(d1_files.values()))
    publish_router(reg, store, writer, "r2", [d0.compartment_id])
    assert live.refresh().sources == ("d0",)  # type: ignore[union-attr]
    assert loader.loads == {"compartment": 2, "router": 2}
    # 3. the forgotten weights registered again (a later version) are refused by their sha256
    d1_copy = publish_compartment(reg, redis_client, keys, store, writer, "d1", seed=1)
    assert d1_copy.files[WEIGHTS].sha256 == d1_files[WEIGHTS] and d1_copy.created_at > 0
    publish_router(reg, store, writer, "r3", [d0.compartment_id, d1_copy.compartment_id])
    assert live.refresh().sources == ("d0",)  # type: ignore[union-attr]
    assert any(r.startswith("d1@v2: its weights") for r in live.status().refused)
    assert loader.loads["compartment"] == 2, "a refused compartment is never loaded"
    # 4. data of d1 sent after the forget trains other weights: that compartment is served
    d1_new = publish_compartment(reg, redis_client, keys, store, writer, "d1", seed=7)
    publish_router(reg, store, writer, "r4", [d0.compartment_id, d1_new.compartment_id])
    assert live.refresh().sources == ("d0", "d1")  # type: ignore[union-attr]
    assert live.readiness()[1] == "the registry watcher is not running"  # refreshed by hand here
    # 5. the one-shot loader (cdm sample --redis) honours the tombstones too
    write_tombstone(redis_client, keys, "d1", [d1_new.files[WEIGHTS].sha256])
    denoiser, _ = load_live_composition(
        RedisConfig(namespace=redis_namespace), artifacts, url=redis_db_url, base_dir=tmp_path / "cli"
    )
    assert denoiser.source_names == ["d0"]


def test_an_unreadable_tombstone_withholds_its_source(
    tmp_path: Path,
    redis_client: redis.Redis,
    keys: Keys,
    reg: Registry,
    store: DirectoryStore,
    live: LiveComposition,
    metrics: SamplerMetrics,
) -> None:
    writer = tmp_path / "writer"
    d0 = publish_compartment(reg, redis_client, keys, store, writer, "d0", seed=0)
    d1 = publish_compartment(reg, redis_client, keys, store, writer, "d1", seed=1)
    publish_router(reg, store, writer, "r1", [d0.compartment_id, d1.compartment_id])
    redis_client.hset(keys.tombstone("d1"), mapping={"forgotten_at": "yesterday"})
    comp = live.refresh()
    assert comp is not None and comp.sources == ("d0",)
    assert metric(metrics, "cdm_registry_watch_errors_total", reason="tombstone") == 1
    assert any("cannot be decoded" in r for r in live.status().refused)


def test_an_unreachable_registry_keeps_the_watcher_alive_but_not_ready(loader: CompositionLoader) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = redis.Redis(port=port, socket_connect_timeout=0.2, socket_timeout=0.2)
    live = LiveComposition(RegistryClient(client, Keys("cdm")), loader, resync_s=0.2)
    live.start()
    try:
        time.sleep(1.0)
        assert live.watcher_alive and live.readiness() == (False, "the registry has not been read yet")
        assert live.refresh() is None and "(registry): ConnectionError" in (live.last_error or "")
    finally:
        live.stop()
        client.close()
