"""Issue 10 (artifacts any host can pull) and issue 8 item 9 (forgetting reaches the readers), with the real services:
a writer trains tiny compartments, uploads them to the S3 server and registers them in Redis; a sampler process in
another working directory, with its own cache, follows the registry, samples, hot-swaps, and after a forget (tombstone
+ retire) never serves the forgotten compartment again and has deleted its cached files."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from cdm.artifacts import ArtifactsConfig, ArtifactStore, open_store, upload_directory
from cdm.compartment import WEIGHTS
from cdm.config import ModelConfig, RouterConfig, TrainConfig
from cdm.data import SourceData
from cdm.routing import save_router, train_router
from cdm.training import train_compartment
from registry.keys import Keys
from registry.records import CompartmentRecord, RouterRecord
from registry.writer import Registry
from tests.cdm.artifacts.conftest import s3_config
from tests.daemon.daemon_harness import digit_sources
from tests.sampler.publish import registry_files

pytestmark = [pytest.mark.slow, pytest.mark.services]

MODEL = ModelConfig(sample_size=8, block_out_channels=(16, 32))  # the daemon harness's tiny configuration
TRAIN = TrainConfig(steps=2, batch_size=16, warmup_steps=1, checkpoint_every=0)
ROUTER = RouterConfig(steps=5, batch_size=32, channels=(16, 32), eval_samples=32)

SAMPLER = """
import json, sys, threading, time
import torch
from prometheus_client import CollectorRegistry
from cdm.artifacts import ArtifactsConfig
from registry.client import connect
from registry.config import RedisConfig
from registry.keys import Keys
from registry.reader import RegistryClient
from sampler.live import LiveComposition
from sampler.loader import CompositionLoader
from sampler.metrics import SamplerMetrics

torch.set_num_threads(1)
redis_cfg, artifacts = RedisConfig(**json.loads(sys.argv[1])), ArtifactsConfig(**json.loads(sys.argv[2]))
client = connect(redis_cfg)
metrics = SamplerMetrics(CollectorRegistry())
loader = CompositionLoader.from_config(artifacts, environ={}, metrics=metrics)  # cache below this process's cwd
live = LiveComposition(RegistryClient(client, Keys(redis_cfg.namespace)), loader, metrics=metrics, resync_s=0.5)
live.start()
served, stop = [], threading.Event()

def sampling():  # a client sampling all along: which epoch, which sources, for every response
    i = 0
    while not stop.is_set():
        try:
            comp, out = live.sample(1, num_inference_steps=1, seed=i)
            served.append([comp.epoch, list(out.source_names)])
            i += 1
        except Exception as exc:
            if live.current() is not None:
                served.append([-1, repr(exc)])
        time.sleep(0.02)

thread = threading.Thread(target=sampling)
thread.start()
for line in sys.stdin:
    if line.strip() == "stop":
        break
    comp, (ready, why) = live.current(), live.readiness()
    blobs = sorted(p.name for p in (loader.cache.root / "blobs").iterdir())
    print(json.dumps({
        "ready": ready, "why": why, "epoch": comp.epoch if comp else None,
        "sources": list(comp.sources) if comp else [],
        "degraded": comp.degraded if comp else "", "registry_epoch": live.status().registry_epoch,
        "loads": dict(loader.loads), "blobs": blobs, "cache_root": str(loader.cache.root), "samples": len(served),
        "purged": metrics.registry.get_sample_value("cdm_artifact_blobs_purged_total"),
    }), flush=True)
stop.set()
thread.join()
live.stop()
client.close()
print(json.dumps({"served": served}), flush=True)
"""


class Sampler:
    """The sampler process, asked for its state one line at a time."""

    def __init__(self, cwd: Path, redis_url: str, namespace: str, artifacts: ArtifactsConfig) -> None:
        cwd.mkdir(parents=True)
        self.log = cwd.parent / "sampler.log"
        self._stderr = open(self.log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                SAMPLER,
                json.dumps({"url": redis_url, "namespace": namespace}),
                json.dumps(dataclasses.asdict(artifacts)),
            ],
            cwd=cwd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            env={k: v for k, v in os.environ.items() if not k.startswith("AWS_")},
        )

    def ask(self) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("status\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"the sampler exited: {self.log.read_text()[-3000:]}"
        return dict(json.loads(line))

    def wait(self, what: str, predicate: Callable[[dict[str, Any]], bool], timeout: float = 120.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            state = self.ask()
            if predicate(state):
                return state
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; last state {state}; log: {self.log}")
            time.sleep(0.2)

    def stop(self) -> list[tuple[int, list[str]]]:
        assert self.proc.stdin is not None
        try:
            out, _ = self.proc.communicate("stop\n", timeout=60)
        finally:
            self._stderr.close()
        assert self.proc.returncode == 0, self.log.read_text()[-3000:]
        return [tuple(x) for x in json.loads(out.strip().splitlines()[-1])["served"]]  # type: ignore[misc]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._stderr.close()


class Writer:
    """What the daemon does for each source: train, save locally, upload to the store, register, delete locally."""

    def __init__(self, reg: Registry, client: redis.Redis, keys: Keys, store: ArtifactStore, workdir: Path) -> None:
        self.reg, self.client, self.keys, self.store, self.workdir = reg, client, keys, store, workdir
        self.data: dict[str, SourceData] = {}

    def compartment(self, source: str, data: SourceData) -> CompartmentRecord:
        rec = self.reg.begin_training(source, f"fp-{source}", {"test": True})
        res = train_compartment(rec.compartment_id, data, model=MODEL, train=TRAIN, num_classes=10, progress=False)
        assert res.compartment is not None
        local = self.workdir / rec.compartment_id
        manifest = res.compartment.save(local)
        prefix = f"compartments/{rec.compartment_id}"
        files = registry_files(upload_directory(self.store, local, prefix))
        shutil.rmtree(local)  # the sampler can only get it from the store
        self.data[rec.compartment_id] = data
        return self.reg.activate(
            rec.compartment_id,
            artifact_uri=self.store.url(prefix),
            sha256=manifest.sha256,
            prior=0.5,
            class_counts=manifest.class_counts,
            n_samples=manifest.n_samples,
            train_metrics={},
            files=files,
        )

    def router(self, router_id: str, compartment_ids: list[str]) -> None:
        rr = train_router(
            {c: self.data[c] for c in compartment_ids}, model=MODEL, router=ROUTER, num_classes=10, progress=False
        )
        local = self.workdir / router_id
        manifest = save_router(rr.router, rr.manifest, local)
        files = registry_files(upload_directory(self.store, local, f"routers/{router_id}"))
        shutil.rmtree(local)
        self.reg.set_router(
            RouterRecord(
                router_id=router_id,
                artifact_uri=self.store.url(f"routers/{router_id}"),
                sha256=manifest.sha256,
                files=files,
                compartment_ids=tuple(compartment_ids),
                trained_at_epoch=self.reg.epoch(),
            )
        )


@pytest.fixture
def sampler_box() -> Iterator[list[Sampler]]:
    box: list[Sampler] = []
    yield box
    for s in box:
        s.kill()


def test_a_sampler_elsewhere_follows_the_registry_through_s3_and_forgets(
    tmp_path: Path,
    redis_client: redis.Redis,
    redis_db_url: str,
    redis_namespace: str,
    s3_endpoint: str,
    s3_bucket: str,
    sampler_box: list[Sampler],
) -> None:
    keys = Keys(redis_namespace)
    reg = Registry(redis_client, keys)
    artifacts = s3_config(s3_endpoint, s3_bucket, cache_dir=".cache/artifacts")
    store = open_store(artifacts, environ={})
    writer = Writer(reg, redis_client, keys, store, tmp_path / "writer")
    src = digit_sources(3)
    # 1. two compartments and their router, uploaded and registered; then the sampler starts elsewhere
    d0, d1 = writer.compartment("d0", src["d0"]), writer.compartment("d1", src["d1"])
    writer.router("r1", [d0.compartment_id, d1.compartment_id])
    sampler = Sampler(tmp_path / "reader", redis_db_url, redis_namespace, artifacts)
    sampler_box.append(sampler)
    state = sampler.wait("the first composition", lambda s: s["ready"] and s["samples"] > 0)
    assert state["sources"] == ["d0", "d1"] and state["loads"] == {"compartment": 2, "router": 1}
    assert Path(state["cache_root"]) == (tmp_path / "reader" / ".cache" / "artifacts").resolve()
    assert not list((tmp_path / "writer").iterdir()), "nothing local to the writer is left to read"
    # 2. a new source and router: hot-swapped, the cached compartments (same id and sha256) not loaded again
    d2 = writer.compartment("d2", src["d2"])
    writer.router("r2", [d0.compartment_id, d1.compartment_id, d2.compartment_id])
    state = sampler.wait("the second composition", lambda s: s["ready"] and s["epoch"] == reg.epoch())
    assert state["sources"] == ["d0", "d1", "d2"] and state["loads"] == {"compartment": 3, "router": 2}
    d1_files = {rel: f.sha256 for rel, f in d1.files.items()}
    assert set(d1_files.values()) <= set(state["blobs"])
    # 3. forget d1 as the lifecycle does: tombstone, retire, delete its objects, retrain the router
    # (the registry writes the tombstone in the forget transaction)
    forgotten_at_epoch = reg.forget_source("d1", "test", files_sha256=sorted(d1_files.values())).epoch
    assert store.delete(f"compartments/{d1.compartment_id}", recursive=True)
    writer.router("r3", [d0.compartment_id, d2.compartment_id])
    state = sampler.wait("the composition without d1", lambda s: s["ready"] and s["epoch"] == reg.epoch())
    assert state["sources"] == ["d0", "d2"] and state["loads"] == {"compartment": 3, "router": 3}
    assert d1_files[WEIGHTS] not in state["blobs"] and d1_files["manifest.json"] not in state["blobs"]
    assert state["purged"] >= 2
    before = state["samples"]
    sampler.wait("more samples", lambda s: s["samples"] > before + 5)
    served = sampler.stop()
    # 4. every response: a known epoch, and from the forget's epoch on, never d1
    assert served and all(epoch >= 0 for epoch, _ in served), [s for s in served if s[0] < 0][:3]
    after = [sources for epoch, sources in served if epoch >= forgotten_at_epoch]
    assert after and all("d1" not in sources for sources in after)
    assert any("d1" in sources for epoch, sources in served if epoch < forgotten_at_epoch)
