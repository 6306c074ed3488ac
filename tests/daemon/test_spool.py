"""Spool: idempotent durable staging, seal verification, registration, forgetting, crash recovery."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from cdm.data import SourceData, concat, fingerprint, load_digits, validate_arrays
from daemon.spool import Spool, SpoolError, SpoolRejected, SpoolState
from daemon.wire import Origin, Seal, WireError

CHUNK = 25


@pytest.fixture(scope="module")
def digits() -> SourceData:
    return load_digits().subset(np.arange(100))


def chunks_of(data: SourceData, size: int = CHUNK) -> list[SourceData]:
    return [data.subset(np.arange(lo, min(len(data), lo + size))) for lo in range(0, len(data), size)]


def seal_of(source: str, data: SourceData, n_chunks: int) -> Seal:
    return Seal(source=source, chunks=n_chunks, fingerprint=fingerprint(data), n_samples=len(data))


def origin(offset: int, partition: int = 0) -> Origin:
    return Origin("cdm.sources", partition, offset)


def stage_all(spool: Spool, source: str, data: SourceData, *, first_offset: int = 0) -> int:
    parts = chunks_of(data)
    for seq, part in enumerate(parts):
        assert spool.stage_chunk(source, seq, part, origin(first_offset + seq)) is True
    return len(parts)


def test_staging_is_idempotent(tmp_path: Path, digits: SourceData) -> None:
    spool = Spool(tmp_path)
    part = chunks_of(digits)[0]
    assert spool.stage_chunk("shoes", 0, part, origin(0)) is True
    size = spool.staged_bytes()
    assert size > 0
    assert spool.stage_chunk("shoes", 0, part, origin(5)) is False  # redelivery, other offset
    assert spool.stage_chunk("shoes", 0, part.subset(np.arange(len(part))), ("cdm.sources", 0, 0)) is False
    assert spool.staged_bytes() == size
    assert spool.state("shoes") == SpoolState.STAGED
    assert spool.lineage("shoes").chunks[0].origin == origin(0)  # the first delivery is the lineage


def test_same_seq_with_different_content_is_rejected(tmp_path: Path, digits: SourceData) -> None:
    spool = Spool(tmp_path)
    a, b = chunks_of(digits)[:2]
    spool.stage_chunk("shoes", 0, a, origin(0))
    with pytest.raises(SpoolRejected) as info:
        spool.stage_chunk("shoes", 0, b, origin(1))
    assert info.value.reason == "seq-conflict"
    assert "shoes#0" in info.value.detail


def test_seal_and_assemble(tmp_path: Path, digits: SourceData) -> None:
    spool = Spool(tmp_path)
    n = stage_all(spool, "shoes", digits)
    assert spool.seal("shoes", seal_of("shoes", digits, n), origin(n)) is True
    assert spool.state("shoes") == SpoolState.SEALED
    assembled = spool.assemble("shoes")
    assert fingerprint(assembled) == fingerprint(digits)
    assert np.array_equal(assembled.ids, digits.ids)
    lineage = spool.lineage("shoes")
    assert [c.origin.offset for c in lineage.chunks] == list(range(n))
    assert lineage.seal_origin == origin(n) and lineage.seal == seal_of("shoes", digits, n)
    # a redelivered seal is a no-op; a redelivered chunk too
    assert spool.seal("shoes", seal_of("shoes", digits, n), origin(n)) is False
    assert spool.stage_chunk("shoes", 1, chunks_of(digits)[1], origin(1)) is False


def test_seal_missing_chunks(tmp_path: Path, digits: SourceData) -> None:
    spool = Spool(tmp_path)
    parts = chunks_of(digits)
    for seq in (0, 3):
        spool.stage_chunk("shoes", seq, parts[seq], origin(seq))
    with pytest.raises(SpoolRejected) as info:
        spool.seal("shoes", seal_of("shoes", digits, 4), origin(9))
    assert info.value.reason == "missing-chunks"
    assert "#1-2" in info.value.detail
    assert spool.state("shoes") == SpoolState.STAGED  # the chunks stay for a re-push


@pytest.mark.parametrize("problem", ["fingerprint", "n_samples", "extra-chunk", "fewer-chunks"])
def test_seal_mismatch(tmp_path: Path, digits: SourceData, problem: str) -> None:
    spool = Spool(tmp_path)
    n = stage_all(spool, "shoes", digits)
    seal = seal_of("shoes", digits, n)
    if problem == "fingerprint":
        seal = Seal("shoes", n, fingerprint(digits.subset(np.arange(len(digits))[::-1])), len(digits))
    elif problem == "n_samples":
        seal = Seal("shoes", n, seal.fingerprint, len(digits) + 1)
    elif problem == "extra-chunk":
        spool.stage_chunk("shoes", n, chunks_of(load_digits().subset(np.arange(200, 210)))[0], origin(99))
    else:
        seal = Seal("shoes", n - 1, seal.fingerprint, len(digits))
    with pytest.raises(SpoolRejected) as info:
        spool.seal("shoes", seal, origin(100))
    assert info.value.reason == "seal-mismatch"
    assert spool.state("shoes") == SpoolState.STAGED


def test_seal_of_chunks_that_do_not_concatenate(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    a = validate_arrays(np.zeros((2, 4, 4), np.uint8), np.array([0, 1]), np.array([0, 1]))
    b = validate_arrays(np.zeros((2, 4, 4), np.uint8), None, np.array([2, 3]))  # unlabelled
    spool.stage_chunk("mixed", 0, a, origin(0))
    spool.stage_chunk("mixed", 1, b, origin(1))
    with pytest.raises(SpoolRejected) as info:
        spool.seal("mixed", Seal("mixed", 2, "0" * 64, 4), origin(2))
    assert info.value.reason == "seal-mismatch" and "concatenate" in info.value.detail


def test_sealed_source_is_immutable(tmp_path: Path, digits: SourceData) -> None:
    spool = Spool(tmp_path)
    n = stage_all(spool, "shoes", digits)
    spool.seal("shoes", seal_of("shoes", digits, n), origin(n))
    with pytest.raises(SpoolRejected) as info:
        spool.stage_chunk("shoes", n, chunks_of(digits)[0], origin(50))
    assert info.value.reason == "sealed"
    with pytest.raises(SpoolRejected) as info:
        spool.seal("shoes", Seal("shoes", n, "0" * 64, len(digits)), origin(51))
    assert info.value.reason == "sealed"


def test_state_survives_a_new_spool(tmp_path: Path, digits: SourceData) -> None:
    spool = Spool(tmp_path)
    n = stage_all(spool, "sealed-one", digits)
    spool.seal("sealed-one", seal_of("sealed-one", digits, n), origin(n))
    spool.stage_chunk("partial", 0, chunks_of(digits)[0], origin(0, partition=1))
    spool.close()
    reopened = Spool(tmp_path)
    assert reopened.sources() == ["partial", "sealed-one"]
    assert reopened.sources(SpoolState.SEALED) == ["sealed-one"]
    assert reopened.sources("staged") == ["partial"]
    assert fingerprint(reopened.assemble("sealed-one")) == fingerprint(digits)
    assert reopened.lineage("partial").chunks[0].origin == origin(0, partition=1)
    assert reopened.stage_chunk("partial", 0, chunks_of(digits)[0], origin(7)) is False


def test_crash_leftovers_are_ignored_on_restart(tmp_path: Path, digits: SourceData) -> None:
    spool = Spool(tmp_path)
    part = chunks_of(digits)[0]
    spool.stage_chunk("shoes", 0, part, origin(0))
    chunk_dir = tmp_path / "sources" / "shoes" / "chunks"
    # a crash while writing chunk 1: a temp file, and a payload whose record was never written
    (chunk_dir / ".tmp-abc-000000001.json").write_bytes(b'{"half": ')
    (chunk_dir / "000000001.npz").write_bytes(b"partial payload")
    (tmp_path / "sources" / "ghost" / "chunks").mkdir(parents=True)
    (tmp_path / "sources" / "ghost" / "chunks" / ".tmp-x-000000000.npz").write_bytes(b"x")
    size_before = (chunk_dir / "000000000.npz").stat().st_size
    spool.close()
    reopened = Spool(tmp_path)
    assert reopened.sources() == ["shoes"]
    assert [c.seq for c in reopened.lineage("shoes").chunks] == [0]
    assert reopened.staged_bytes() == size_before
    assert not list(tmp_path.rglob(".tmp-*"))
    assert reopened.stage_chunk("shoes", 1, chunks_of(digits)[1], origin(1)) is True


def test_idle_sources_count_only_live_fetching(tmp_path: Path, digits: SourceData) -> None:
    now = [1000.0]
    spool = Spool(tmp_path, monotonic=lambda: now[0])
    n = stage_all(spool, "sealed", digits)
    spool.seal("sealed", seal_of("sealed", digits, n), origin(n))
    spool.stage_chunk("abandoned", 0, chunks_of(digits)[0], origin(10))
    spool.stage_chunk("other-partition", 0, chunks_of(digits)[0], origin(0, partition=1))
    now[0] += 100
    assert spool.idle_sources(10) == []  # no partition is live yet: nothing is idle, however long
    spool.set_live_partitions([("cdm.sources", 0)])
    now[0] += 30
    spool.stage_chunk("active", 0, chunks_of(digits)[0], origin(11))
    now[0] += 30
    assert spool.idle_sources(45) == ["abandoned"]  # 60 s live and quiet
    assert spool.idle_sources(10) == ["abandoned", "active"]
    spool.set_live_partitions([])  # paused or behind: the clocks stop and restart when live again
    now[0] += 1000
    assert spool.idle_sources(10) == []
    spool.set_live_partitions([("cdm.sources", 0), ("cdm.sources", 1)])
    now[0] += 20
    assert spool.idle_sources(30) == []
    assert spool.idle_sources(10) == ["abandoned", "active", "other-partition"]


def test_registered_source_purges_payloads_and_stays_idempotent(tmp_path: Path, digits: SourceData) -> None:
    spool = Spool(tmp_path)
    with pytest.raises(SpoolError):
        spool.mark_registered("shoes", "c-1")
    n = stage_all(spool, "shoes", digits)
    with pytest.raises(SpoolError, match="seal it"):
        spool.mark_registered("shoes", "c-1")
    spool.seal("shoes", seal_of("shoes", digits, n), origin(n))
    spool.mark_registered("shoes", "c-1")
    spool.mark_registered("shoes", "c-1")  # idempotent
    with pytest.raises(SpoolError, match="already registered"):
        spool.mark_registered("shoes", "c-2")
    assert spool.state("shoes") == SpoolState.REGISTERED and spool.staged_bytes() == 0
    spool.close()
    spool = Spool(tmp_path)
    assert spool.lineage("shoes").compartment_id == "c-1"
    # redeliveries after registration are still recognised
    assert spool.stage_chunk("shoes", 0, chunks_of(digits)[0], origin(0)) is False
    assert spool.seal("shoes", seal_of("shoes", digits, n), origin(n)) is False
    with pytest.raises(SpoolError, match="registered"):
        spool.assemble("shoes")


def test_drop_forgets_and_ignores_redeliveries(tmp_path: Path, digits: SourceData) -> None:
    spool = Spool(tmp_path)
    n = stage_all(spool, "shoes", digits, first_offset=10)
    spool.seal("shoes", seal_of("shoes", digits, n), origin(10 + n))
    receipt = spool.drop("shoes")
    assert receipt.through == {"cdm.sources/0": 10 + n}
    assert len(receipt.files) == 2 * n + 1  # payload + record per chunk, state.json
    assert spool.state("shoes") is None and spool.sources() == [] and spool.staged_bytes() == 0
    assert not (tmp_path / "sources" / "shoes").exists()
    # redelivered records of the forgotten source are ignored ...
    assert spool.forgotten("shoes", origin(10)) and spool.forgotten("shoes", origin(10 + n))
    assert spool.stage_chunk("shoes", 0, chunks_of(digits)[0], origin(10)) is False
    assert spool.seal("shoes", seal_of("shoes", digits, n), origin(10 + n)) is False
    assert spool.state("shoes") is None
    # ... but a new push of the same id (later offsets) is a new source
    assert not spool.forgotten("shoes", origin(10 + n + 1))
    assert not spool.forgotten("shoes", origin(10, partition=1))
    stage_all(spool, "shoes", digits, first_offset=100)
    assert spool.state("shoes") == SpoolState.STAGED
    assert spool.drop("unknown").files == ()


def test_interrupted_drop_is_finished_on_open(tmp_path: Path, digits: SourceData) -> None:
    spool = Spool(tmp_path / "spool")
    stage_all(spool, "shoes", digits)
    spool.stage_chunk("keep", 0, chunks_of(digits)[0], origin(50))
    source_dir = tmp_path / "spool" / "sources" / "shoes"
    backup = tmp_path / "backup"
    shutil.copytree(source_dir, backup)
    spool.drop("shoes")
    shutil.copytree(backup, source_dir)  # as if the crash came after the tombstone, before the delete
    spool.close()
    reopened = Spool(tmp_path / "spool")
    assert reopened.sources() == ["keep"]
    assert not source_dir.exists()


def test_chunks_concatenate_in_seq_order_not_arrival_order(tmp_path: Path, digits: SourceData) -> None:
    spool = Spool(tmp_path)
    parts = chunks_of(digits)
    for seq in reversed(range(len(parts))):
        spool.stage_chunk("shoes", seq, parts[seq], origin(10 - seq))
    spool.seal("shoes", seal_of("shoes", digits, len(parts)), origin(11))
    assert fingerprint(spool.assemble("shoes")) == fingerprint(concat(parts)) == fingerprint(digits)


def test_tampered_payload_is_detected(tmp_path: Path, digits: SourceData) -> None:
    spool = Spool(tmp_path)
    n = stage_all(spool, "shoes", digits)
    spool.seal("shoes", seal_of("shoes", digits, n), origin(n))
    payload = tmp_path / "sources" / "shoes" / "chunks" / "000000002.npz"
    payload.write_bytes(payload.read_bytes() + b"\0")
    with pytest.raises(SpoolError, match="sha256"):
        spool.assemble("shoes")


def test_source_ids_are_validated(tmp_path: Path, digits: SourceData) -> None:
    spool = Spool(tmp_path)
    for bad in ["..", "a/b", ""]:
        with pytest.raises(WireError) as info:
            spool.stage_chunk(bad, 0, chunks_of(digits)[0], origin(0))
        assert info.value.reason == "bad-key"
