"""A registry on the test Redis, a local artifact store the writer uploads to, and a reader with its own cache."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from prometheus_client import CollectorRegistry

from cdm.artifacts import ArtifactsConfig, DirectoryStore
from registry.keys import Keys
from registry.writer import Registry
from sampler.loader import CompositionLoader
from sampler.metrics import SamplerMetrics


@pytest.fixture
def keys(redis_namespace: str) -> Keys:
    return Keys(redis_namespace)


@pytest.fixture
def reg(redis_client: redis.Redis, keys: Keys) -> Registry:
    return Registry(redis_client, keys)


@pytest.fixture
def store(tmp_path: Path) -> DirectoryStore:
    """The artifact store writers upload to (``file://``; the S3 backend is in test_remote.py)."""
    return DirectoryStore(tmp_path / "store")


@pytest.fixture
def artifacts(store: DirectoryStore) -> ArtifactsConfig:
    return ArtifactsConfig(url=store.root_url, cache_max_bytes=64 * 1024 * 1024)


@pytest.fixture
def metrics() -> SamplerMetrics:
    return SamplerMetrics(CollectorRegistry())


@pytest.fixture
def loader(artifacts: ArtifactsConfig, tmp_path: Path, metrics: SamplerMetrics) -> Iterator[CompositionLoader]:
    """The reader's loader, its cache in its own directory."""
    loader = CompositionLoader.from_config(artifacts, base_dir=tmp_path / "reader", metrics=metrics)
    yield loader
    loader.close()


def wait_until(what: str, predicate: Callable[[], object], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def metric(metrics: SamplerMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value
