"""Property test of the ingest loop (issue 8): batches of arbitrary records (any key, headers and value: the
generators of test_wire_fuzz.py, on both topics) go through ``Ingestor.poll_once``. Whatever they hold, the poll
never raises and never turns a record into an infrastructure failure; every record is either accepted (staged,
sealed, a duplicate, a control command) or dead-lettered with a reason of ``daemon.wire.REASONS`` in a copy the
producer takes; a good source pushed after them is still sealed; and once the staged sources are registered every
record is committed.

The consumer is an in-memory stand-in (batches as a real poll returns them); the dead-letter producer checks each
copy as ``KafkaProducer.send`` does (key or value present, (str, bytes) headers, the serialized size against
``max_request_size``, with kafka-python's own size estimate). The same path against the real broker is
test_ingest.py::test_bad_records_go_to_the_dlq_with_their_reason_and_ingest_goes_on.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import MessageSizeTooLargeError
from kafka.record.default_records import DefaultRecordBatchBuilder
from kafka.structs import OffsetAndMetadata, TopicPartition
from prometheus_client import CollectorRegistry

from cdm.data import fingerprint, load_digits
from daemon.config import KafkaConfig
from daemon.ingest import Ingestor
from daemon.metrics import Metrics
from daemon.spool import Spool
from daemon.wire import REASONS, ControlCommand, Origin, Seal, WireMessage, encode_chunk, encode_seal
from tests.daemon.test_ingest import FakeConsumer
from tests.daemon.test_wire_fuzz import ClaimRoot, control_records, fuzz_settings, savez, source_records

pytestmark = pytest.mark.slow

N_BATCHES = 1000  # poll_once calls on generated batches of 1-12 records (about 4,500 records a run, ~30 s)
MAX_MESSAGE_BYTES = 64 * 1024  # kafka.max_message_bytes of the fuzzed daemon (the DLQ producer's max_request_size)
SOURCES, CONTROL = "cdm.sources", "cdm.control"
GOOD = "zz-after-the-fuzz"  # a source no generated key names (the generators' ids are at most 20 characters)


class SizeCheckingProducer:
    """The dead-letter producer: refuses a copy as ``KafkaProducer.send`` would, records the others."""

    def __init__(self, max_request_size: int) -> None:
        self.max_request_size = max_request_size
        self.sent: list[WireMessage] = []

    def send(self, topic: str, key: bytes | None, value: bytes | None, headers: list[tuple[str, Any]]) -> Any:
        if key is None and value is None:
            raise ValueError("Need at least one: key or value")
        if not all(isinstance(h, tuple) and len(h) == 2 and isinstance(h[0], str) and isinstance(h[1], bytes)
                   for h in headers):  # fmt: skip
            raise TypeError("All headers items must be (str, bytes) tuples")
        size = DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, headers)
        if size > self.max_request_size:
            raise MessageSizeTooLargeError(f"The message is {size} bytes when serialized")
        self.sent.append(WireMessage(key=key, value=value, headers=list(headers)))
        return self

    def get(self, timeout: float | None = None) -> None:
        return None  # acknowledged


class Consumer(FakeConsumer):
    """FakeConsumer over the two topics of the fuzzed daemon."""

    def __init__(self, batch: dict[TopicPartition, list[ConsumerRecord]]) -> None:
        super().__init__(batch)
        self.partitions = set(batch)

    def assignment(self) -> set[TopicPartition]:
        return self.partitions


def good_source() -> list[WireMessage]:
    data = load_digits().subset(np.arange(12))
    return [encode_chunk(GOOD, 0, data), encode_seal(Seal(GOOD, 1, fingerprint(data), len(data)))]


def as_record(message: WireMessage, topic: str, partition: int, offset: int) -> ConsumerRecord:
    return ConsumerRecord(
        topic, partition, 0, offset, 0, 0, message.key, message.value, message.headers, None, -1, -1, -1
    )


def test_any_records_are_staged_or_dead_lettered_with_a_reason_and_polling_goes_on(tmp_path: Path) -> None:
    good = savez({"images": np.zeros((2, 4, 4), np.uint8), "ids": np.arange(2)}, True)
    claims = ClaimRoot(tmp_path / "claims", good, [good[:-10]])
    config = KafkaConfig(
        sources_topic=SOURCES, control_topic=CONTROL, dlq_topic="cdm.dlq", max_message_bytes=MAX_MESSAGE_BYTES
    )
    after = good_source()
    totals: Counter[str] = Counter()

    @fuzz_settings(N_BATCHES)
    @given(batch=st.lists(st.one_of(source_records(claims), control_records()), min_size=1, max_size=12))
    def check(batch: list[ConsumerRecord]) -> None:
        # 1. the generated records, on two source partitions and the control topic, then a good source
        offsets: Counter[TopicPartition] = Counter()
        fetched: dict[TopicPartition, list[ConsumerRecord]] = {}
        for i, rec in enumerate([*batch, *(as_record(m, SOURCES, 0, 0) for m in after)]):
            tp = TopicPartition(CONTROL, 0) if rec.topic == CONTROL else TopicPartition(SOURCES, i % 2)
            if i >= len(batch):
                tp = TopicPartition(SOURCES, 0)
            fetched.setdefault(tp, []).append(rec._replace(topic=tp.topic, partition=tp.partition, offset=offsets[tp]))
            offsets[tp] += 1
        consumer, dlq = Consumer(fetched), SizeCheckingProducer(MAX_MESSAGE_BYTES)
        metrics = Metrics(CollectorRegistry())
        sealed: list[str] = []
        controls: list[ControlCommand] = []
        with tempfile.TemporaryDirectory(dir=tmp_path) as spool_dir:
            spool = Spool(Path(spool_dir))
            ingestor: Ingestor | None = None

            def on_control(command: ControlCommand, origin: Origin) -> None:
                assert isinstance(command, ControlCommand)
                controls.append(command)
                assert ingestor is not None
                ingestor.mark_control_done(origin)

            try:
                ingestor = Ingestor(
                    consumer,
                    dlq,
                    spool,
                    metrics,
                    config,
                    on_sealed=sealed.append,
                    on_control=on_control,
                    claim_check_root=claims.root,
                    max_ref_bytes=1 << 20,
                    max_decoded_bytes=1 << 20,
                )
                # 2. one poll handles them all: nothing raises, no record is an infrastructure failure
                report = ingestor.poll_once()
                assert report.failure == "" and ingestor.problem() is None, report.failure
                assert report.records == len(batch) + len(after)
                # 3. each record accepted or dead-lettered (once, with a reason); the good source is sealed after all
                where = {
                    (h["cdm-dlq-topic"].decode(), int(h["cdm-dlq-partition"]), int(h["cdm-dlq-offset"])): h
                    for h in (dict(m.headers) for m in dlq.sent)
                }
                assert len(where) == len(dlq.sent) <= len(batch)
                assert all(k in {(tp.topic, tp.partition, r.offset) for tp, rs in fetched.items() for r in rs}
                           for k in where)  # fmt: skip
                reasons = Counter(h["cdm-dlq-reason"].decode() for h in where.values())
                assert set(reasons) <= set(REASONS), reasons
                accepted = metrics.registry.get_sample_value("cdm_messages_ingested_total") or 0
                assert accepted + len(dlq.sent) == report.records
                assert sum(report.rejected.values()) == len(dlq.sent)
                assert GOOD in sealed
                # 4. once the staged sources are registered, everything is committed
                for source in spool.sources():
                    ingestor.mark_source_registered(source)
                ingestor.poll_once()
                committed: dict[TopicPartition, OffsetAndMetadata] = {}
                for commit in consumer.commits:
                    committed.update(commit)
                assert {tp: om.offset for tp, om in committed.items()} == dict(offsets)
                totals.update(reasons)
                totals["accepted"] += int(accepted) - len(after)
                totals["control"] += len(controls)
            finally:
                spool.close()

    check()
    records = sum(totals.values()) - totals["control"]
    print(f"{records} records in {N_BATCHES} polls: {dict(sorted(totals.items()))}")
    assert records >= 2 * N_BATCHES
    # deep enough: accepted records, and refusals of the decoder and of the spool
    for outcome in ("accepted", "control", "bad-npz", "bad-json", "bad-header", "oversized", "missing-chunks"):
        assert totals[outcome] >= 5, (outcome, totals)
