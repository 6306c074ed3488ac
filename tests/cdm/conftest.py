"""Tiny models and data so library tests run in seconds on 2 CPU cores."""

from __future__ import annotations

import numpy as np
import pytest

from cdm.config import ModelConfig, RouterConfig, TrainConfig
from cdm.data import SourceData, load_digits

TINY_MODEL = ModelConfig(sample_size=8, block_out_channels=(16, 32), norm_num_groups=8, num_classes=10)
TINY_TRAIN = TrainConfig(steps=6, batch_size=32, warmup_steps=2, checkpoint_every=2, lr=1e-3)
TINY_ROUTER = RouterConfig(steps=30, batch_size=64, channels=(16, 32), eval_samples=128)


@pytest.fixture(scope="session")
def digits() -> SourceData:
    return load_digits()


@pytest.fixture(scope="session")
def two_class_disjoint_sources(digits: SourceData) -> dict[str, SourceData]:
    """Digits 0-2 (about 30%) and 3-9 (about 70%): class-disjoint sources with unequal priors."""
    assert digits.labels is not None
    low = digits.subset(np.flatnonzero(digits.labels <= 2))
    high = digits.subset(np.flatnonzero(digits.labels >= 3))
    return {"low": low, "high": high}
