"""Spool reliability (issue 8): limits before allocation, the in-memory chunk index, sources that can never
train, recovery from damage (``.tmp-`` source ids, corrupt records), one spool per daemon."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from cdm.config import ModelConfig
from cdm.data import SourceData, concat, fingerprint, load_digits, validate_arrays
from cdm.training import check_trainable
from daemon.spool import Spool, SpoolLimits, SpoolLocked, SpoolRejected
from daemon.wire import Origin, Seal

CHUNK = 10


@pytest.fixture(scope="module")
def digits() -> SourceData:
    return load_digits().subset(np.arange(60))


def parts_of(data: SourceData, size: int = CHUNK) -> list[SourceData]:
    return [data.subset(np.arange(lo, min(len(data), lo + size))) for lo in range(0, len(data), size)]


def origin(offset: int, partition: int = 0) -> Origin:
    return Origin("cdm.sources", partition, offset)


def seal_of(source: str, data: SourceData, n_chunks: int) -> Seal:
    return Seal(source=source, chunks=n_chunks, fingerprint=fingerprint(data), n_samples=len(data))


def stage(spool: Spool, source: str, parts: list[SourceData], first_offset: int = 0) -> None:
    for seq, part in enumerate(parts):
        assert spool.stage_chunk(source, seq, part, origin(first_offset + seq))


def rejected(call: object, *args: object) -> SpoolRejected:
    with pytest.raises(SpoolRejected) as info:
        call(*args)  # type: ignore[operator]
    return info.value


# ------------------------------------------------------------------------------------------------ item 5: sizes


def test_a_seal_of_a_billion_chunks_is_refused_at_once(tmp_path: Path, digits: SourceData) -> None:
    spool = Spool(tmp_path)
    stage(spool, "huge", parts_of(digits)[:1])
    started = time.perf_counter()
    err = rejected(spool.seal, "huge", Seal("huge", 10**9, "0" * 64, 10), origin(1))
    assert err.reason == "limit-exceeded" and "max_chunks_per_source" in err.detail
    assert spool.state("huge") is None  # dropped whole: it can never be completed
    assert spool.forgotten("huge", origin(0)) and spool.forgotten("huge", origin(1))
    # below the limit, the missing chunks are computed from the set staged, not from range(chunks)
    limits = SpoolLimits(max_source_chunks=10**9)
    spool.close()
    spool = Spool(tmp_path / "big", limits=limits)
    stage(spool, "wide", parts_of(digits)[:3])
    err = rejected(spool.seal, "wide", Seal("wide", 10**9 - 1, "0" * 64, 30), origin(3))
    assert err.reason == "missing-chunks" and "#3-999999998" in err.detail
    assert time.perf_counter() - started < 2.0


def test_a_chunk_at_a_huge_seq_is_refused_and_idle_sealing_it_is_cheap(tmp_path: Path, digits: SourceData) -> None:
    spool = Spool(tmp_path)
    err = rejected(spool.stage_chunk, "far", 999_999_999, parts_of(digits)[0], origin(0))
    assert err.reason == "limit-exceeded" and "999999999" in err.detail
    assert spool.sources() == []
    # with the limit raised to what cdm-seq allows: idle sealing a gapped source does not walk the gap
    spool.close()
    now = [0.0]
    spool = Spool(tmp_path / "wide", limits=SpoolLimits(max_source_chunks=10**9), monotonic=lambda: now[0])
    spool.stage_chunk("far", 0, parts_of(digits)[0], origin(0))
    spool.stage_chunk("far", 999_999_999, parts_of(digits)[1], origin(1))
    spool.set_live_partitions([("cdm.sources", 0)])
    now[0] += 31
    assert spool.idle_sources(30) == ["far"]
    started = time.perf_counter()
    err = rejected(spool.seal_idle, "far")
    assert time.perf_counter() - started < 1.0
    assert err.reason == "missing-chunks" and "#1-999999998" in err.detail
    assert spool.state("far") is None  # dropped: its records are released, nothing of it is trained


@pytest.mark.parametrize(
    ("limits", "what"),
    [
        (SpoolLimits(max_source_samples=25), "spool_max_source_samples"),
        (SpoolLimits(max_source_bytes=25 * (8 * 8 + 16)), "spool_max_source_bytes"),
        (SpoolLimits(max_source_chunks=2), "max_chunks_per_source"),
    ],
)
def test_a_source_over_a_per_source_limit_is_refused_and_dropped(
    tmp_path: Path, digits: SourceData, limits: SpoolLimits, what: str
) -> None:
    spool = Spool(tmp_path, limits=limits)
    dropped: list[str] = []
    spool.add_drop_listener(dropped.append)
    parts = parts_of(digits)
    stage(spool, "big", parts[:2])
    err = rejected(spool.stage_chunk, "big", 2, parts[2], origin(2))
    assert err.reason == "limit-exceeded" and what in err.detail
    assert spool.state("big") is None and dropped == ["big"]
    assert all(spool.forgotten("big", origin(o)) for o in range(3))
    assert not (tmp_path / "sources" / "big").exists()
    # a seal announcing more than the limits allow is refused before anything is concatenated
    err = rejected(spool.seal, "other", Seal("other", 3, "0" * 64, 10**8), origin(9))
    assert err.reason == "limit-exceeded"


def test_spool_wide_limits(tmp_path: Path, digits: SourceData) -> None:
    parts = parts_of(digits)
    spool = Spool(tmp_path / "a", limits=SpoolLimits(max_sources=2))
    spool.stage_chunk("s1", 0, parts[0], origin(0))
    spool.stage_chunk("s2", 0, parts[1], origin(1))
    err = rejected(spool.stage_chunk, "s3", 0, parts[2], origin(2))
    assert err.reason == "limit-exceeded" and "spool_max_sources" in err.detail
    assert spool.stage_chunk("s2", 1, parts[3], origin(3))  # sources already started go on
    spool.seal("s1", seal_of("s1", parts[0], 1), origin(4))
    spool.mark_registered("s1", "c-1")  # a registered source holds no data: a slot is free again
    assert spool.stage_chunk("s3", 0, parts[2], origin(5))

    one = len(spool_payload(spool, "s3"))
    disk = Spool(tmp_path / "b", limits=SpoolLimits(max_bytes=int(2.5 * one)))
    disk.stage_chunk("d", 0, parts[0], origin(0))
    disk.stage_chunk("d", 1, parts[1], origin(1))
    err = rejected(disk.stage_chunk, "d", 2, parts[2], origin(2))
    assert err.reason == "limit-exceeded" and "spool_max_bytes" in err.detail
    assert disk.state("d") is None and disk.staged_bytes() == 0  # never trained on a prefix


def spool_payload(spool: Spool, source: str) -> bytes:
    return (spool.root / "sources" / source / "chunks" / "000000000.npz").read_bytes()


def test_the_chunk_index_is_in_memory_and_rebuilt_at_open(tmp_path: Path, digits: SourceData) -> None:
    spool = Spool(tmp_path)
    parts = parts_of(digits)
    stage(spool, "s", parts[:3])
    lineage = spool.lineage("s")
    # staging does not re-read the chunk records: damaging one on disk does not affect the running spool
    record = tmp_path / "sources" / "s" / "chunks" / "000000000.json"
    good = record.read_bytes()
    record.write_bytes(b"{")
    assert spool.stage_chunk("s", 3, parts[3], origin(3))
    assert spool.stage_chunk("s", 0, parts[0], origin(7)) is False  # a redelivery, recognised from memory
    record.write_bytes(good)
    spool.close()
    reopened = Spool(tmp_path)
    assert reopened.lineage("s").chunks[:3] == lineage.chunks
    assert [c.seq for c in reopened.lineage("s").chunks] == [0, 1, 2, 3]
    assert reopened.seal("s", seal_of("s", concat(parts[:4]), 4), origin(8))


# ------------------------------------------------------------------------------------------------ item 6


@pytest.mark.parametrize("problem", ["unlabelled", "label-too-large", "channels"])
def test_a_source_that_can_never_train_is_refused_at_its_seal_and_dropped(
    tmp_path: Path, digits: SourceData, problem: str
) -> None:
    model = ModelConfig(num_classes=10, in_channels=1)
    data = digits
    assert data.labels is not None
    if problem == "unlabelled":
        data = validate_arrays(digits.images, None, digits.ids)
    elif problem == "label-too-large":
        model = ModelConfig(num_classes=5, in_channels=1)
    else:
        model = ModelConfig(num_classes=10, in_channels=3)
    spool = Spool(tmp_path, check=partial(check_trainable, model=model, num_classes=model.num_classes))
    dropped: list[str] = []
    spool.add_drop_listener(dropped.append)
    parts = parts_of(data)
    stage(spool, "never", parts)
    err = rejected(spool.seal, "never", seal_of("never", data, len(parts)), origin(len(parts)))
    assert err.reason == "incompatible"
    assert {"unlabelled": "unlabelled", "label-too-large": "num_classes = 5", "channels": "in_channels"}[
        problem
    ] in err.detail
    assert spool.state("never") is None and dropped == ["never"]
    assert all(spool.forgotten("never", origin(o)) for o in range(len(parts) + 1))  # offsets released for good
    # a compatible source passes the same check
    stage(spool, "fine", parts_of(digits), first_offset=100)
    ok = ModelConfig(num_classes=10, in_channels=1)
    spool.close()
    spool = Spool(tmp_path, check=partial(check_trainable, model=ok, num_classes=10))
    assert spool.seal("fine", seal_of("fine", digits, len(parts)), origin(200))


def test_an_idle_source_that_can_never_train_is_dropped(tmp_path: Path, digits: SourceData) -> None:
    now = [0.0]
    model = ModelConfig(num_classes=10)
    spool = Spool(tmp_path, monotonic=lambda: now[0], check=partial(check_trainable, model=model, num_classes=10))
    dropped: list[str] = []
    spool.add_drop_listener(dropped.append)
    stage(spool, "nolabels", parts_of(validate_arrays(digits.images, None, digits.ids)))
    spool.set_live_partitions([("cdm.sources", 0)])
    now[0] += 60
    assert spool.idle_sources(30) == ["nolabels"]
    assert rejected(spool.seal_idle, "nolabels").reason == "incompatible"
    assert spool.state("nolabels") is None and dropped == ["nolabels"]


def test_an_idle_source_whose_seal_was_refused_is_dropped_not_sealed_on_a_prefix(
    tmp_path: Path, digits: SourceData
) -> None:
    now = [0.0]
    spool = Spool(tmp_path, monotonic=lambda: now[0])
    parts = parts_of(digits)
    stage(spool, "cut", parts[:4])  # chunks 4 and 5 never arrived (e.g. dead-lettered)
    assert rejected(spool.seal, "cut", seal_of("cut", digits, 6), origin(6)).reason == "missing-chunks"
    spool.set_live_partitions([("cdm.sources", 0)])
    now[0] += 60
    assert rejected(spool.seal_idle, "cut").reason == "missing-chunks"
    assert spool.state("cut") is None


# ------------------------------------------------------------------------------------------------ item 7


def test_a_source_id_that_looks_like_a_temp_file_does_not_stop_a_restart(tmp_path: Path, digits: SourceData) -> None:
    spool = Spool(tmp_path)
    stage(spool, "keep", parts_of(digits)[:2])
    stage(spool, "victim", parts_of(digits)[:2], first_offset=10)
    spool.close()
    # what an older daemon (which accepted such ids) left behind: a source directory named .tmp-evil
    (tmp_path / "sources" / "victim").rename(tmp_path / "sources" / ".tmp-evil")
    (tmp_path / "sources" / "keep" / "chunks" / ".tmp-abc-000000002.json").write_bytes(b"{")  # a real temp file
    reopened = Spool(tmp_path)
    assert (tmp_path / "sources" / ".tmp-evil").is_dir() or [q.name for q in reopened.quarantined] == [".tmp-evil"]
    assert not (tmp_path / "sources" / "keep" / "chunks" / ".tmp-abc-000000002.json").exists()
    assert [c.seq for c in reopened.lineage("keep").chunks] == [0, 1]


@pytest.mark.parametrize("damage", ["truncated-state", "garbage-state", "chunk-record", "lost-payload"])
def test_one_damaged_source_is_quarantined_and_start_up_continues(
    tmp_path: Path, digits: SourceData, damage: str
) -> None:
    spool = Spool(tmp_path)
    parts = parts_of(digits)
    stage(spool, "bad", parts[:2])
    spool.seal("bad", seal_of("bad", concat(parts[:2]), 2), origin(2))
    stage(spool, "good", parts[:2], first_offset=20)
    spool.close()
    src = tmp_path / "sources" / "bad"
    if damage == "truncated-state":
        state = src / "state.json"
        state.write_bytes(state.read_bytes()[:20])
    elif damage == "garbage-state":
        (src / "state.json").write_text(json.dumps({"format": 1, "state": "sealed", "seal": "x"}))
    elif damage == "chunk-record":
        (src / "chunks" / "000000001.json").write_bytes(b"\0\0\0")
    else:
        (src / "chunks" / "000000001.npz").unlink()
    reopened = Spool(tmp_path)
    assert reopened.sources() == ["good"]
    assert [q.name for q in reopened.quarantined] == ["bad"]
    moved = reopened.quarantined[0].path
    assert moved.parent == tmp_path / "quarantine" and (moved / "REASON.txt").read_text().startswith("bad:")
    assert not src.exists()
    # its records, redelivered from Kafka (never committed), stage it afresh
    stage(reopened, "bad", parts[:2])
    assert reopened.seal("bad", seal_of("bad", concat(parts[:2]), 2), origin(2))


def test_a_damaged_tombstone_keeps_the_source_forgotten(tmp_path: Path, digits: SourceData) -> None:
    spool = Spool(tmp_path)
    stage(spool, "gone", parts_of(digits)[:2])
    spool.drop("gone")
    spool.close()
    (tmp_path / "tombstones" / "gone.json").write_bytes(b'{"format": 1, "thr')
    reopened = Spool(tmp_path)
    assert [q.name for q in reopened.quarantined] == ["tombstone:gone"]
    assert reopened.forgotten("gone", origin(0)) and reopened.forgotten("gone", origin(10**6, partition=3))
    assert reopened.stage_chunk("gone", 0, parts_of(digits)[0], origin(0)) is False


# ------------------------------------------------------------------------------------------------ item 9


def test_one_spool_directory_one_owner(tmp_path: Path) -> None:
    first = Spool(tmp_path)
    with pytest.raises(SpoolLocked, match=str(tmp_path)):
        Spool(tmp_path)
    first.close()
    Spool(tmp_path).close()  # released by close
    # another process holds it: the error names its pid
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from daemon.spool import Spool; s = Spool(sys.argv[1]); "
         "print('locked', flush=True); sys.stdin.read()", str(tmp_path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"locked\n"
        with pytest.raises(SpoolLocked) as info:
            Spool(tmp_path)
        assert f"pid {holder.pid}" in str(info.value) and "spool_dir" in str(info.value)
    finally:
        holder.communicate(b"", timeout=30)
    Spool(tmp_path).close()  # a dead holder's lock is gone with its process
