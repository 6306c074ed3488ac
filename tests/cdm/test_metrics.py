"""FID / KID / memorisation on synthetic features and images; the feature classifier's save -> load (its training is
exercised by the benchmarks)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from cdm.errors import IntegrityError
from cdm.metrics import WEIGHTS_FILE, ExtractorConfig, FeatureExtractor, FeatureNet, fid, kid, memorisation


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


def test_feature_extractor_save_load_gives_the_same_features_and_refuses_tampered_weights(tmp_path: Path) -> None:
    config = ExtractorConfig(widths=(4, 8), feature_dim=6)
    torch.manual_seed(0)
    net = FeatureNet(8, 3, config)
    meta = {"test_accuracy": 0.5, "sample_size": 8, "num_classes": 3, "config": dataclasses.asdict(config), "key": "k"}
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 8), dtype=np.uint8)
    saved = FeatureExtractor(net, sample_size=8, meta=meta)
    directory = saved.save(tmp_path / "ext")
    saved.save(directory)  # replacing a saved extractor is atomic too
    loaded = FeatureExtractor.load(directory, expected_key="k")
    assert loaded.from_cache and loaded.meta["weights_sha256"] == saved.meta["weights_sha256"]
    np.testing.assert_array_equal(loaded.features(images), saved.features(images))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ext"]  # no temp or old directory left
    raw = bytearray((directory / WEIGHTS_FILE).read_bytes())
    raw[-1] ^= 1
    (directory / WEIGHTS_FILE).write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match="sha256"):
        FeatureExtractor.load(directory)
