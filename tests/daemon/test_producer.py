"""push_source / send_control against a recording producer (no broker): order, claim checks, errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from kafka.consumer.fetcher import ConsumerRecord

from cdm.data import SourceData, concat, fingerprint, load_digits
from daemon.producer import push_source, send_control
from daemon.wire import Chunk, ControlCommand, Origin, Seal, decode_control, decode_source_message


@dataclass
class Metadata:
    topic: str
    partition: int
    offset: int


@dataclass
class Future:
    value: Metadata

    def get(self, timeout: float | None = None) -> Metadata:
        return self.value


@dataclass
class RecordingProducer:
    """Stands in for KafkaProducer: keeps what was sent, and when flush() was called."""

    sent: list[tuple[str, bytes | None, bytes | None, list[tuple[str, bytes]]]] = field(default_factory=list)
    flushed_at: list[int] = field(default_factory=list)

    def send(self, topic: str, *, key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]]) -> Any:
        self.sent.append((topic, key, value, headers))
        return Future(Metadata(topic, 0, len(self.sent) - 1))

    def flush(self, timeout: float | None = None) -> None:
        self.flushed_at.append(len(self.sent))

    def records(self) -> list[ConsumerRecord]:
        return [ConsumerRecord(t, 0, 0, i, 0, 0, k, v, h, None, -1, -1, -1) for i, (t, k, v, h) in enumerate(self.sent)]


@pytest.fixture(scope="module")
def digits() -> SourceData:
    return load_digits().subset(np.arange(100))


def test_push_sends_chunks_in_order_then_the_seal_after_a_flush(digits: SourceData) -> None:
    producer = RecordingProducer()
    report = push_source(producer, "cdm.sources", "shoes", digits, chunk_size=30, progress=False)  # type: ignore[arg-type]
    assert (report.chunks, report.inline_chunks, report.ref_chunks, report.n_samples) == (4, 4, 0, 100)
    assert (report.first_offset, report.seal_offset) == (0, 4)
    assert producer.flushed_at == [4]  # all chunks flushed before the seal was sent
    decoded = [decode_source_message(r) for r in producer.records()]
    chunks = [m for m in decoded if isinstance(m, Chunk)]
    assert [c.seq for c in chunks] == [0, 1, 2, 3] and [len(c.data) for c in chunks] == [30, 30, 30, 10]
    seal = decoded[-1]
    assert seal == Seal("shoes", 4, fingerprint(digits), 100) and report.fingerprint == seal.fingerprint
    assert fingerprint(concat([c.data for c in chunks])) == seal.fingerprint  # what the spool will verify


def test_large_chunks_go_by_claim_check(tmp_path: Path, digits: SourceData) -> None:
    producer = RecordingProducer()
    report = push_source(
        producer,  # type: ignore[arg-type]
        "cdm.sources",
        "shoes",
        digits,
        chunk_size=50,
        claim_check_dir=tmp_path,
        inline_limit=100,
        progress=False,
    )
    assert (report.inline_chunks, report.ref_chunks) == (0, 2)
    files = sorted((tmp_path / "shoes").iterdir())
    assert len(files) == 2 and not list(tmp_path.rglob(".tmp-*"))
    decoded = [decode_source_message(r, claim_check_root=tmp_path) for r in producer.records()]
    assert [m.ref is not None for m in decoded if isinstance(m, Chunk)] == [True, True]


def test_push_errors(digits: SourceData) -> None:
    producer = RecordingProducer()
    with pytest.raises(ValueError, match="source id"):
        push_source(producer, "t", "a/b", digits, chunk_size=10, progress=False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="chunk_size"):
        push_source(producer, "t", "a", digits, chunk_size=0, progress=False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="inline_limit"):
        push_source(producer, "t", "a", digits, chunk_size=10, inline_limit=10, progress=False)  # type: ignore[arg-type]
    assert producer.sent == []  # the first chunk is checked before anything is sent


def test_send_control(digits: SourceData) -> None:
    producer = RecordingProducer()
    command = ControlCommand(op="forget-samples", source="shoes", sample_ids=(1, 2), request_id="r-9")
    assert send_control(producer, "cdm.control", command) == Origin("cdm.control", 0, 0)  # type: ignore[arg-type]
    assert decode_control(producer.records()[0]) == command
    assert producer.sent[0][1] == b"shoes"  # keyed by source: commands on one source stay ordered
