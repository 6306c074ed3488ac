"""Fixtures of the registry tests: a key namespace per test, a writer with a deterministic clock."""

from __future__ import annotations

import pytest
import redis

from registry.keys import Keys
from registry.records import CompartmentRecord
from registry.writer import Registry

SHA = {"unet/diffusion_pytorch_model.safetensors": "ab" * 32}


class FakeClock:
    """Deterministic wall clock for timestamps (Redis TTLs still run on Redis' own clock)."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


@pytest.fixture
def keys(redis_namespace: str) -> Keys:
    return Keys(redis_namespace)


@pytest.fixture
def registry(redis_client: redis.Redis, keys: Keys) -> Registry:
    return Registry(redis_client, keys, clock=FakeClock())


def train_and_activate(registry: Registry, source: str, fingerprint: str, n: int = 10) -> CompartmentRecord:
    record = registry.begin_training(source, fingerprint, {"topic": "cdm.sources", "offsets": {"0": n}})
    return registry.activate(
        record.compartment_id,
        artifact_uri=f"/artifacts/{record.compartment_id}",
        sha256=SHA,
        prior=float(n),
        class_counts=[n, 0],
        n_samples=n,
        train_metrics={"final_loss": 0.1},
    )
