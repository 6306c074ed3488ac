"""Fixtures of the ``cdm serve`` tests: tiny compartments trained once per session, registered per test in the
REAL test Redis (its own database and namespace), and the app built per test around them.

``serve(...)`` builds an app over a fresh registry with three sources (alpha, beta, gamma; beta tagged
``license=cc-by``, gamma ``tenant=acme``) and counts every compartment call per source, so tests can check that a
request never evaluates a compartment it may not use.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from starlette.testclient import TestClient

from api.app import create_app
from api.auth import Authenticator
from api.config import ServeConfig
from api.ui import GridCache
from cdm.artifacts import ArtifactsConfig, artifact_uri
from cdm.config import ModelConfig, RouterConfig, SampleConfig, TrainConfig
from cdm.data import SourceData, load_digits
from cdm.lifecycle import ForgetReceipt
from cdm.routing import save_router, train_router
from cdm.training import train_compartment
from registry.acl import AccessRegistry, Grant, ServeLedger
from registry.keys import Keys
from registry.reader import RegistryClient
from registry.records import RouterRecord
from registry.writer import Registry
from sampler.engine import Sampler
from sampler.live import LiveComposition
from sampler.loader import CompositionLoader

MODEL = ModelConfig(sample_size=8, block_out_channels=(16, 32))
TRAIN = TrainConfig(steps=2, batch_size=16, warmup_steps=1, checkpoint_every=0)
ROUTER = RouterConfig(steps=5, batch_size=32, channels=(16, 32), eval_samples=32)
SOURCES = ("alpha", "beta", "gamma")
TAGS = {"beta": {"license": "cc-by"}, "gamma": {"tenant": "acme", "license": "proprietary"}}
FAST = SampleConfig(num_inference_steps=2, scheduler="ddim")


def digit_sources(n: int) -> list[SourceData]:
    """sklearn digits split into ``n`` class-disjoint sources."""
    d = load_digits()
    assert d.labels is not None
    return [d.subset(np.flatnonzero(np.isin(d.labels, g))) for g in np.array_split(np.arange(10), n)]


@dataclass(frozen=True)
class Trained:
    """Saved artifacts of one tiny compartment per source and a router over all of them."""

    compartments: dict[str, tuple[Path, dict[str, str], tuple[int, ...], int]]  # source -> dir, sha256, counts, n
    router_dir: Path
    router_sha256: dict[str, str]


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    root = tmp_path_factory.mktemp("serve-artifacts")
    data = dict(zip(SOURCES, digit_sources(len(SOURCES)), strict=True))
    comps = {}
    for name, d in data.items():
        res = train_compartment(f"{name}@v1", d, model=MODEL, train=TRAIN, num_classes=10, progress=False)
        assert res.compartment is not None
        m = res.compartment.save(root / name)
        comps[name] = (root / name, dict(m.sha256), tuple(m.class_counts), m.n_samples)
    rr = train_router({f"{n}@v1": data[n] for n in SOURCES}, model=MODEL, router=ROUTER, num_classes=10, progress=False)
    rm = save_router(rr.router, rr.manifest, root / "router")
    return Trained(comps, root / "router", dict(rm.sha256))


def register(reg: Registry, trained: Trained, sources: Sequence[str] = SOURCES) -> int:
    """Activate ``sources`` (version 1 each) and the router over all three; returns the epoch."""
    for name in sources:
        path, sha, counts, n = trained.compartments[name]
        rec = reg.begin_training(name, f"fp-{name}", {"test": True})
        reg.activate(
            rec.compartment_id,
            artifact_uri=artifact_uri(path),
            sha256=sha,
            prior=1.0,
            class_counts=counts,
            n_samples=n,
            train_metrics={},
        )
    return reg.set_router(
        RouterRecord(
            router_id="router-all",
            artifact_uri=artifact_uri(trained.router_dir),
            sha256=trained.router_sha256,
            compartment_ids=tuple(f"{n}@v1" for n in SOURCES),
        )
    )


@dataclass
class Served:
    """One app over its own registry, and the handles a test needs."""

    app: FastAPI
    client: TestClient
    registry: Registry
    access: AccessRegistry
    ledger: ServeLedger
    live: LiveComposition
    metrics: CollectorRegistry
    settings: ServeConfig
    calls: Counter[str] = field(default_factory=Counter)  # compartment forward calls per source
    rows: Counter[str] = field(default_factory=Counter)  # input rows over those calls per source

    def token(self, principal: str, *grants: str) -> str:
        """A new token of ``principal`` holding ``grants`` (``all``, ``source:x``, ``tag:k=v``)."""
        if grants:
            self.access.grant(principal, [Grant.parse(g) for g in grants])
        return self.access.create_token(principal).token

    def count_calls(self) -> None:
        """Count forward calls of every compartment of the served composition, and their input rows (by source)."""
        comp = self.live.current()
        assert comp is not None

        def counter(name: str) -> Callable[[Any, tuple[Any, ...]], None]:
            def hook(_module: Any, args: tuple[Any, ...]) -> None:
                self.calls.update([name])
                self.rows.update({name: int(args[0].shape[0])})

            return hook

        for name, module in zip(comp.sources, comp.denoiser.compartments, strict=True):
            if not getattr(module, "_counted", False):
                module.register_forward_pre_hook(counter(name))
                module._counted = True


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def serve(
    trained: Trained, redis_client: redis.Redis, redis_namespace: str, tmp_path: Path
) -> Iterator[Callable[..., Served]]:
    """``serve(settings=..., sampler=..., sources=..., grids=...)`` -> a Served app (closed after the test)."""
    opened: list[TestClient] = []
    lives: list[LiveComposition] = []

    def make(
        settings: ServeConfig | None = None,
        *,
        sampler: Sampler | None = None,
        sources: Sequence[str] = SOURCES,
        clock: Callable[[], float] = time.time,
        grids: GridCache | None = None,
    ) -> Served:
        keys = Keys(redis_namespace)
        reg = Registry(redis_client, keys)
        if sources:
            register(reg, trained, sources)
        access = AccessRegistry(redis_client, keys)
        for source, tags in TAGS.items():
            access.set_tags(source, tags)
        loader = CompositionLoader.from_config(
            ArtifactsConfig(url=trained.router_dir.parent.as_uri()),  # the artifacts' directory is the store
            base_dir=tmp_path / f"reader-{len(lives)}",
            vectorize="loop",
        )
        live = LiveComposition(RegistryClient(redis_client, keys), loader, sample=FAST)
        lives.append(live)
        live.refresh()
        settings = settings or ServeConfig(max_n=8, max_steps=4, max_concurrent=2)
        ledger = ServeLedger(redis_client, keys, audit_maxlen=settings.audit_maxlen)
        metrics = CollectorRegistry()
        app = create_app(
            settings,
            live=live,
            auth=Authenticator(access, anonymous_principal=settings.anonymous_principal),
            registry_reader=RegistryClient(redis_client, keys),
            metrics_registry=metrics,
            clock=clock,
            ledger=ledger,
            sampler=sampler,
            sample_defaults=FAST,
            grids=grids,
        )
        client = TestClient(app, raise_server_exceptions=False)
        opened.append(client)
        served = Served(app, client, reg, access, ledger, live, metrics, settings)
        if live.current() is not None:
            served.count_calls()
        return served

    yield make
    for client in opened:
        client.close()
    for live in lives:
        live.stop()  # unpins the cached artifact files


def decode_images(doc: dict[str, Any]) -> np.ndarray:
    """The images of a JSON /v1/samples response as uint8 (N, H, W, C)."""
    import base64
    import io

    from PIL import Image

    out = []
    for b64 in doc["images"]:
        with Image.open(io.BytesIO(base64.b64decode(b64))) as im:
            a = np.asarray(im)
        out.append(a[..., None] if a.ndim == 2 else a)
    return np.stack(out)


def forget_with_receipt(registry: Registry, source: str, reason: str) -> ForgetReceipt:
    """Forget ``source`` in the registry and store the receipt the lifecycle writes once the request completes
    (the status pages read both; the lifecycle itself is tested in tests/cdm and tests/daemon)."""
    tomb = registry.forget_source(source, reason, request_id=f"forget-{source}-{time.time_ns()}")
    receipt = ForgetReceipt(
        request_id=tomb.request_id,
        kind="forget-source",
        source=source,
        outcome="forgotten",
        detail=reason,
        n_samples_removed=0,
        fingerprint="",
        new_fingerprint=None,
        retired=tomb.compartment_ids,
        new_compartment=None,
        deleted_files=(),
        untouched={},
        router_before=None,
        router_after=None,
        router_sha256_before=None,
        router_sha256_after=None,
        epoch=tomb.epoch,
    )
    assert registry.put_receipt(receipt.request_id, receipt.to_dict())
    return receipt
