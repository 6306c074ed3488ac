"""FID / KID / memorisation on synthetic features and images (the classifier itself is exercised by the benchmarks)."""

from __future__ import annotations

import numpy as np
import pytest

from cdm.metrics import fid, kid, memorisation


def test_fid_is_zero_for_identical_sets_and_matches_the_closed_form() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 8))
    assert fid(a, a) == pytest.approx(0.0, abs=1e-6)
    # N(0, I) vs N(mu, 4 I): ||mu||^2 + tr(I + 4I - 2 * 2I) = ||mu||^2 + d
    mu = np.full(8, 0.5)
    b = rng.normal(size=(4000, 8)) * 2 + mu
    want = float(mu @ mu) + 8.0
    assert fid(a, b) == pytest.approx(want, rel=0.08)
    assert fid(a, a + 1.0) > fid(a, a + 0.1)


def test_kid_is_near_zero_for_the_same_distribution_and_positive_otherwise() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(1000, 16)), rng.normal(size=(1000, 16))
    same, _ = kid(a, b, subset_size=200)
    diff, _ = kid(a, b + 1.0, subset_size=200)
    assert abs(same) < 0.05 < diff


def test_memorisation_detects_copies_and_ignores_fresh_samples() -> None:
    rng = np.random.default_rng(2)
    train = rng.integers(0, 256, (50, 8, 8), dtype=np.uint8)
    copies = train[:10]
    fresh = rng.integers(0, 256, (10, 8, 8), dtype=np.uint8)
    m = memorisation(np.concatenate([copies, fresh]), {"a": train[:25], "b": train[25:]})
    assert m.n == 20 and m.n_memorised == 10 and m.fraction == pytest.approx(0.5)
    assert m.memorised[:10].all() and not m.memorised[10:].any()
    assert m.per_source["a"].n_memorised == 10
