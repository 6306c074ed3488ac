"""SISA slicing (cdm/training.py): fixed slices by sample id, a checkpoint after each slice, and a retrain from the
checkpoint before the first changed slice that equals training from scratch on the data left (CPU, one thread)."""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cdm.artifacts import load_tensors, read_json, sha256_file
from cdm.compartment import Compartment
from cdm.config import ModelConfig, TrainConfig
from cdm.data import SourceData, load_digits
from cdm.errors import ConfigError
from cdm.training import (
    SLICES_DIR,
    SlicePlan,
    TrainResult,
    checkpoint_files,
    slice_ends,
    slice_of,
    train_compartment,
)

MODEL = ModelConfig(sample_size=8, block_out_channels=(8, 16), norm_num_groups=4, num_classes=10)
TRAIN = TrainConfig(steps=8, batch_size=16, warmup_steps=1, checkpoint_every=3, lr=1e-3, threads=1, slices=4)


@pytest.fixture(autouse=True)
def restore_torch_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data() -> SourceData:
    return load_digits().subset(slice(0, 120))


def train(data: SourceData, workdir: Path | None, cfg: TrainConfig = TRAIN, **kw: object) -> TrainResult:
    return train_compartment("a", data, model=MODEL, train=cfg, num_classes=10, workdir=workdir, progress=False, **kw)  # type: ignore[arg-type]


def weights(result: TrainResult) -> dict[str, torch.Tensor]:
    assert result.compartment is not None
    return result.compartment.unet.state_dict()


def same_weights(a: TrainResult, b: TrainResult) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def checkpoint_sha(workdir: Path, j: int) -> tuple[str, str]:
    tensors, meta = checkpoint_files(j)
    return sha256_file(workdir / tensors), sha256_file(workdir / meta)


def seed_from(src: Path, dest: Path, slices: range) -> None:
    """Copy the checkpoints after ``slices`` of one run into another work dir (what the lifecycle does)."""
    for j in slices:
        for rel in checkpoint_files(j):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / rel, dest / rel)


def test_slices_are_fixed_by_the_sample_id_and_cover_the_steps() -> None:
    ids = np.arange(10_000, dtype=np.int64)
    s = slice_of(ids, 8)
    assert s.min() == 0 and s.max() == 7 and np.bincount(s).min() > 1100  # about N / 8 each
    # removing samples moves no other sample: the slice is a function of the id alone
    keep = ids % 3 != 0
    assert np.array_equal(slice_of(ids[keep], 8), s[keep])
    assert np.array_equal(slice_of(ids[::-1], 8), s[::-1])
    assert np.array_equal(slice_of(ids, 1), np.zeros_like(ids))
    assert slice_ends(10, 4) == (2, 5, 7, 10) and slice_ends(8, 8) == tuple(range(1, 9))
    with pytest.raises(ConfigError, match=r"slices = 9 must be in 1\.\.steps = 8"):
        slice_ends(8, 9)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"slices": 0}, "train.slices = 0 must be >= 1"),
        ({"slices": 1025}, "train.slices = 1025 must be <= 1024"),
        ({"slices": 9, "steps": 8}, "train.slices = 9 must be <= train.steps = 8"),
    ],
)
def test_the_slices_key_is_range_checked(kw: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        dataclasses.replace(TRAIN, **kw)


def test_one_slice_keeps_no_checkpoint_and_records_no_slice(tmp_path: Path, data: SourceData) -> None:
    one = train(data, tmp_path / "w", dataclasses.replace(TRAIN, slices=1))
    assert one.compartment is not None and one.compartment.manifest.slices == ()
    assert not (tmp_path / "w" / SLICES_DIR).exists() and (one.base_slice, one.base_step) == (0, 0)


def test_a_checkpoint_with_ema_is_kept_after_every_slice_but_the_last(tmp_path: Path, data: SourceData) -> None:
    result = train(data, tmp_path / "w")
    assert result.compartment is not None and result.steps == TRAIN.steps
    plan = SlicePlan.of(data, TRAIN)
    records = result.compartment.manifest.slices
    assert [r.index for r in records] == [1, 2, 3, 4] and [r.end_step for r in records] == [2, 4, 6, 8]
    assert sum(r.n_samples for r in records) == len(data)
    assert [r.fingerprint for r in records] == list(plan.fingerprints)
    assert records[-1].checkpoint == {}, "the state after the last slice is the compartment itself"
    for r in records[:-1]:
        assert r.checkpoint == {rel: sha256_file(tmp_path / "w" / rel) for rel in checkpoint_files(r.index)}
        meta = read_json(tmp_path / "w" / checkpoint_files(r.index)[1])
        assert (meta["step"], meta["slice"], meta["fingerprints"]) == (
            r.end_step,
            r.index,
            list(plan.fingerprints)[: r.index],
        )
        tensors = load_tensors(tmp_path / "w" / checkpoint_files(r.index)[0], expected_sha256=meta["sha256"])
        assert any(k.startswith("ema.") for k in tensors) and any(k.startswith("opt.") for k in tensors)
    # the manifest (slices included) survives save -> load
    saved = result.compartment.save(tmp_path / "c")
    assert Compartment.load(tmp_path / "c").manifest == saved and saved.slices == records


def test_a_retrain_from_the_checkpoint_before_the_first_changed_slice_equals_training_from_scratch(
    tmp_path: Path, data: SourceData
) -> None:
    original = train(data, tmp_path / "original")
    plan = SlicePlan.of(data, TRAIN)
    k = 3  # forget one sample of slice 3: slices 1 and 2 hold the same samples as before
    victim = int(data.ids[plan.assignment == k - 1][0])
    kept = data.subset(data.ids != victim)
    assert SlicePlan.of(kept, TRAIN).shared_prefix(original.compartment.manifest.slices) == k - 1  # type: ignore[union-attr]
    # every checkpoint of the original run is offered; only those after slices < k may be used
    seed_from(tmp_path / "original", tmp_path / "resumed", range(1, TRAIN.slices))
    seen: list[int] = []
    resumed = train(kept, tmp_path / "resumed", on_step=lambda s, _: seen.append(s))
    assert (resumed.base_slice, resumed.base_step, resumed.resumed_from) == (k - 1, plan.start(k), plan.start(k))
    assert seen == list(range(plan.start(k) + 1, TRAIN.steps + 1)), "only slices k..S are retrained"
    scratch = train(kept, tmp_path / "scratch")
    assert scratch.base_slice == 0 and same_weights(resumed, scratch)
    assert not same_weights(resumed, original)
    for j in range(1, TRAIN.slices):
        new = checkpoint_sha(tmp_path / "resumed", j)
        assert new == checkpoint_sha(tmp_path / "scratch", j), f"checkpoint {j} differs from a fresh run's"
        if j < k:
            assert new == checkpoint_sha(tmp_path / "original", j), f"checkpoint {j} < {k} must be byte-identical"
        else:
            assert new[0] != checkpoint_sha(tmp_path / "original", j)[0], f"checkpoint {j} >= {k} must be rebuilt"


def test_checkpoints_of_other_data_or_another_config_are_not_resumed_from(tmp_path: Path, data: SourceData) -> None:
    train(data, tmp_path / "original")
    plan = SlicePlan.of(data, TRAIN)
    first = data.subset(data.ids != int(data.ids[plan.assignment == 0][0]))  # slice 1 changed
    seed_from(tmp_path / "original", tmp_path / "a", range(1, TRAIN.slices))
    seen: list[int] = []
    result = train(first, tmp_path / "a", on_step=lambda s, _: seen.append(s))
    assert result.base_slice == 0 and seen == list(range(1, TRAIN.steps + 1))
    other = dataclasses.replace(TRAIN, lr=2e-3)
    seed_from(tmp_path / "original", tmp_path / "b", range(1, TRAIN.slices))
    assert train(data, tmp_path / "b", other).base_slice == 0


def test_an_interrupted_sliced_run_resumes_and_reports_where_its_training_started(
    tmp_path: Path, data: SourceData
) -> None:
    full = train(data, tmp_path / "full")
    plan = SlicePlan.of(data, TRAIN)
    kept = data.subset(data.ids != int(data.ids[plan.assignment == 2][0]))  # slice 3 changed: resume after 2
    seed_from(tmp_path / "full", tmp_path / "w", range(1, 3))
    seen: list[int] = []
    part = train(kept, tmp_path / "w", should_stop=lambda: len(seen) >= 3, on_step=lambda s, _: seen.append(s))
    assert part.interrupted and part.steps == plan.start(3) + 3
    rest = train(kept, tmp_path / "w")
    assert rest.resumed_from == plan.start(3) + 3 and (rest.base_slice, rest.base_step) == (2, plan.start(3))
    assert same_weights(rest, train(kept, tmp_path / "scratch")) and not same_weights(rest, full)
