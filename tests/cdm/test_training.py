"""Compartments: save -> load -> identical outputs, tampering refused, resume continues exactly."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from cdm.compartment import WEIGHTS, Compartment
from cdm.errors import ConfigError, IntegrityError, StoreError
from cdm.training import ResumableBatches, lr_at, train_compartment
from tests.cdm.conftest import TINY_MODEL, TINY_TRAIN


def _probe(c: Compartment) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    x = torch.randn((5, 1, 8, 8), generator=g)
    return c(x, torch.tensor([0, 10, 300, 700, 999]), torch.tensor([0, 1, 2, 3, 10]))


def test_train_save_load_same_output(tmp_path: Path, two_class_disjoint_sources) -> None:
    data = two_class_disjoint_sources["low"]
    res = train_compartment("low", data, model=TINY_MODEL, train=TINY_TRAIN, num_classes=10, progress=False)
    assert res.compartment is not None and not res.interrupted and res.steps == TINY_TRAIN.steps
    m = res.compartment.save(tmp_path / "low")
    assert WEIGHTS in m.sha256 and m.n_samples == len(data) and m.steps == TINY_TRAIN.steps
    assert sum(m.class_counts) == len(data) and m.class_counts[5] == 0
    loaded = Compartment.load(tmp_path / "low")
    with torch.no_grad():
        torch.testing.assert_close(_probe(res.compartment), _probe(loaded), rtol=0, atol=0)
    assert loaded.manifest == m


def test_tampered_weights_are_refused(tmp_path: Path, two_class_disjoint_sources) -> None:
    res = train_compartment(
        "low",
        two_class_disjoint_sources["low"],
        model=TINY_MODEL,
        train=dataclasses.replace(TINY_TRAIN, steps=1),
        num_classes=10,
        progress=False,
    )
    assert res.compartment is not None
    res.compartment.save(tmp_path / "c")
    weights = tmp_path / "c" / WEIGHTS
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0xFF
    weights.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match="sha256"):
        Compartment.load(tmp_path / "c")


def test_registry_hash_mismatch_is_refused(tmp_path: Path, two_class_disjoint_sources) -> None:
    res = train_compartment(
        "low",
        two_class_disjoint_sources["low"],
        model=TINY_MODEL,
        train=dataclasses.replace(TINY_TRAIN, steps=1),
        num_classes=10,
        progress=False,
    )
    assert res.compartment is not None
    m = res.compartment.save(tmp_path / "c")
    bad = dict(m.sha256, **{WEIGHTS: "0" * 64})
    with pytest.raises(IntegrityError):
        Compartment.load(tmp_path / "c", expected_sha256=bad)


def test_resume_after_interruption_continues_not_restarts(tmp_path: Path, two_class_disjoint_sources) -> None:
    data = two_class_disjoint_sources["high"]
    full = train_compartment("h", data, model=TINY_MODEL, train=TINY_TRAIN, num_classes=10, progress=False)
    steps_seen: list[int] = []
    stop_after = 4

    def should_stop() -> bool:
        return len(steps_seen) >= stop_after

    part = train_compartment(
        "h",
        data,
        model=TINY_MODEL,
        train=TINY_TRAIN,
        num_classes=10,
        workdir=tmp_path,
        progress=False,
        should_stop=should_stop,
        on_step=lambda s, _: steps_seen.append(s),
    )
    assert part.interrupted and part.compartment is None and part.steps == stop_after
    assert (tmp_path / "train_state" / "state.json").exists()
    steps_seen.clear()
    rest = train_compartment(
        "h",
        data,
        model=TINY_MODEL,
        train=TINY_TRAIN,
        num_classes=10,
        workdir=tmp_path,
        progress=False,
        on_step=lambda s, _: steps_seen.append(s),
    )
    assert rest.resumed_from == stop_after
    assert steps_seen == list(range(stop_after + 1, TINY_TRAIN.steps + 1)), "resume must not redo steps"
    assert rest.compartment is not None and full.compartment is not None
    with torch.no_grad():
        torch.testing.assert_close(_probe(rest.compartment), _probe(full.compartment), rtol=1e-5, atol=1e-6)


def test_resume_refuses_a_checkpoint_of_another_config(tmp_path: Path, two_class_disjoint_sources) -> None:
    data = two_class_disjoint_sources["low"]
    train_compartment(
        "l",
        data,
        model=TINY_MODEL,
        train=TINY_TRAIN,
        num_classes=10,
        workdir=tmp_path,
        progress=False,
        should_stop=lambda: True,
    )
    with pytest.raises(StoreError, match="different"):
        train_compartment(
            "l",
            data,
            model=TINY_MODEL,
            train=dataclasses.replace(TINY_TRAIN, lr=0.5),
            num_classes=10,
            workdir=tmp_path,
            progress=False,
        )


def test_channel_mismatch_is_a_clear_error(two_class_disjoint_sources) -> None:
    rgb = dataclasses.replace(TINY_MODEL, in_channels=3)
    with pytest.raises(ConfigError, match="in_channels"):
        train_compartment(
            "l", two_class_disjoint_sources["low"], model=rgb, train=TINY_TRAIN, num_classes=10, progress=False
        )


def test_batches_are_deterministic_and_resumable() -> None:
    x = torch.arange(10).float().view(10, 1, 1, 1)
    a = ResumableBatches(x, None, 4, seed=1)
    seq = [next(a)[0].flatten().tolist() for _ in range(5)]
    b = ResumableBatches(x, None, 4, seed=1, start_step=3)
    assert [next(b)[0].flatten().tolist() for _ in range(2)] == seq[3:]
    # every sample once per epoch: the first 10 drawn (2.5 batches) are a permutation
    flat = [v for batch in seq for v in batch][:10]
    assert sorted(flat) == list(range(10))


def test_lr_schedule_warmup_then_cosine() -> None:
    cfg = dataclasses.replace(TINY_TRAIN, steps=100, warmup_steps=10, lr=1.0)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.5, abs=1e-6)
    assert lr_at(100, cfg) == pytest.approx(0.0, abs=1e-9)
