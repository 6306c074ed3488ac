"""Ingestor: offset tracking and failure rewind (unit), then against the real broker: staging, sealing,
redelivery, dead letters, offset commits, rebalance. Tests using ``kafka_bootstrap`` are marked ``services``."""

from __future__ import annotations

import io
import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from kafka import KafkaConsumer, KafkaProducer, OffsetAndMetadata, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import KafkaTimeoutError
from prometheus_client import CollectorRegistry

from cdm.data import SourceData, fingerprint, load_digits, validate_arrays
from cdm.errors import DataError
from daemon.config import KafkaConfig
from daemon.ingest import Ingestor, OffsetTracker, PollReport
from daemon.metrics import Metrics
from daemon.producer import push_source, send_control
from daemon.spool import Spool, SpoolLimits, SpoolState
from daemon.wire import (
    REASONS,
    Chunk,
    ControlCommand,
    Origin,
    RecordLike,
    Seal,
    WireMessage,
    decode_source_message,
    encode_chunk,
    encode_chunk_bytes,
    encode_control,
    encode_seal,
    sha256_hex,
)

MAX_MESSAGE_BYTES = 64 * 1024
JOIN_TIMEOUT_S = 60.0  # the first join of a group takes ~3 s on an idle Tansu; generous for loaded CI machines


@dataclass
class Harness:
    """One daemon's ingest side: consumer + DLQ producer + Ingestor over a spool, with recorded callbacks."""

    ingestor: Ingestor
    spool: Spool
    consumer: KafkaConsumer
    dlq_producer: KafkaProducer
    metrics: Metrics
    sealed: list[str]
    controls: list[tuple[ControlCommand, Origin]]
    reports: list[PollReport] = field(default_factory=list)  # of every poll_until

    def poll_until(self, done: Callable[[], bool], timeout_s: float = JOIN_TIMEOUT_S) -> list[PollReport]:
        """Poll until ``done()``; the reports of these polls."""
        reports = []
        deadline = time.monotonic() + timeout_s
        while not done():
            assert time.monotonic() < deadline, f"timed out; reports so far: {reports}"
            reports.append(self.ingestor.poll_once(timeout_ms=200))
            self.reports.append(reports[-1])
        return reports

    def metric(self, name: str, **labels: str) -> float | None:
        return self.metrics.registry.get_sample_value(name, labels)

    def rejected(self) -> Counter[str]:
        return Counter({r: n for r in REASONS if (n := int(self.metric("cdm_dlq_messages_total", reason=r) or 0))})

    def close(self) -> None:
        self.ingestor.close()
        self.consumer.close()
        self.dlq_producer.close()
        self.spool.close()


@pytest.fixture
def config(kafka_bootstrap: str, unique_topic: Callable[[str], str]) -> KafkaConfig:
    return KafkaConfig(
        bootstrap_servers=kafka_bootstrap,
        sources_topic=unique_topic("sources"),
        control_topic=unique_topic("control"),
        dlq_topic=unique_topic("dlq"),
        group_id=unique_topic("group"),
        session_timeout_ms=6000,
        heartbeat_interval_ms=1000,
        max_message_bytes=MAX_MESSAGE_BYTES,
    )


@pytest.fixture
def producer(config: KafkaConfig) -> Iterator[KafkaProducer]:
    p = KafkaProducer(**config.producer_kwargs(max_request_size=4 * MAX_MESSAGE_BYTES))
    yield p
    p.close()


@pytest.fixture
def make_harness(config: KafkaConfig, tmp_path: Path) -> Iterator[Callable[..., Harness]]:
    made: list[Harness] = []

    def make(
        *,
        spool: str = "spool",
        on_control: Callable[[ControlCommand, Origin], None] | None = None,
        spool_kwargs: dict[str, Any] | None = None,
        **kwargs: object,
    ) -> Harness:
        metrics = Metrics(CollectorRegistry(), dlq_reasons=REASONS)
        sealed: list[str] = []
        controls: list[tuple[ControlCommand, Origin]] = []

        def record_control(command: ControlCommand, origin: Origin) -> None:
            controls.append((command, origin))
            if on_control is not None:
                on_control(command, origin)

        consumer = KafkaConsumer(**config.consumer_kwargs())
        dlq_producer = KafkaProducer(**config.producer_kwargs())
        the_spool = Spool(tmp_path / spool, **(spool_kwargs or {}))
        ingestor = Ingestor(
            consumer,
            dlq_producer,
            the_spool,
            metrics,
            config,
            on_sealed=sealed.append,
            on_control=record_control,
            **kwargs,  # type: ignore[arg-type]
        )
        harness = Harness(ingestor, the_spool, consumer, dlq_producer, metrics, sealed, controls)
        made.append(harness)
        return harness

    yield make
    for h in reversed(made):
        h.close()  # a no-op for what the test closed itself


@pytest.fixture(scope="module")
def digits() -> SourceData:
    return load_digits().subset(np.arange(120))


def committed(consumer: KafkaConsumer, topic: str, partition: int) -> int | None:
    return consumer.committed(TopicPartition(topic, partition))


def send(producer: KafkaProducer, topic: str, message: WireMessage) -> Origin:
    md = producer.send(topic, key=message.key, value=message.value, headers=message.headers).get(timeout=10)
    return Origin(md.topic, md.partition, md.offset)


# ------------------------------------------------------------------------------------------------ unit tests

TP0, TP1 = TopicPartition("s", 0), TopicPartition("s", 1)


def test_offset_tracker_commits_the_contiguous_done_prefix() -> None:
    t = OffsetTracker()
    t.add(TP0, 10, 3, ("source", "a"))
    t.add(TP0, 11, 3, None)
    t.add(TP0, 14, 4, ("dlq", 14))  # offsets may have gaps
    t.add(TP1, 0, 0, ("control", 0))
    assert t.committable() == {} and t.pending() == 3
    t.release(("source", "a"))
    assert t.committable() == {TP0: OffsetAndMetadata(12, "", 3)}  # up to the record waiting for the DLQ
    t.release(("dlq", 14))
    t.release(("control", 0))
    ready = t.committable()
    assert ready == {TP0: OffsetAndMetadata(15, "", 4), TP1: OffsetAndMetadata(1, "", 0)}
    t.committed({TP0: ready[TP0]})  # TP1's commit failed: it stays ready and is offered again
    assert t.committable() == {TP1: OffsetAndMetadata(1, "", 0)}
    t.add(TP1, 1, 0, ("source", "b"))
    t.forget([TP1])  # revoked
    assert t.committable() == {} and t.pending() == 0


class FakeConsumer:
    """The KafkaConsumer calls the Ingestor makes, over one canned batch."""

    def __init__(self, batch: dict[TopicPartition, list[ConsumerRecord]]) -> None:
        self.config = {"group_id": "g", "enable_auto_commit": False}
        self.batch = batch
        self.seeks: dict[TopicPartition, int] = {}
        self.commits: list[dict[TopicPartition, OffsetAndMetadata]] = []
        self.paused: set[TopicPartition] = set()

    def subscribe(self, topics: list[str], listener: object) -> None:
        pass

    def poll(self, timeout_ms: int) -> dict[TopicPartition, list[ConsumerRecord]]:
        if self.paused:
            return {}
        batch, self.batch = self.batch, {}
        return batch

    def assignment(self) -> set[TopicPartition]:
        return {TP0, TP1}

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks[tp] = offset

    def pause(self, *tps: TopicPartition) -> None:
        self.paused = set(tps)

    def resume(self, *tps: TopicPartition) -> None:
        self.paused = set()

    def commit(self, offsets: dict[TopicPartition, OffsetAndMetadata], timeout_ms: int | None = None) -> None:
        self.commits.append(offsets)

    def highwater(self, tp: TopicPartition) -> None:
        return None

    def beginning_offsets(self, tps: list[TopicPartition], timeout_ms: int | None = None) -> dict[TopicPartition, int]:
        return {tp: 0 for tp in tps}  # the broker check: the broker answers


def test_a_failure_while_handling_rewinds_backs_off_and_retries(tmp_path: Path, digits: SourceData) -> None:
    config = KafkaConfig(sources_topic="s", control_topic="c", dlq_topic="d")

    def rec(partition: int, offset: int, message: WireMessage) -> ConsumerRecord:
        return ConsumerRecord(
            "s", partition, 0, offset, 0, 0, message.key, message.value, message.headers, None, -1, -1, -1
        )

    part = digits.subset(np.arange(10))
    seal = encode_seal(Seal("x", 1, fingerprint(part), 10))
    batch = {
        TP0: [rec(0, 5, encode_chunk("x", 0, part)), rec(0, 6, seal), rec(0, 7, encode_chunk("y", 0, part))],
        TP1: [rec(1, 3, encode_chunk("z", 0, part))],
    }
    consumer = FakeConsumer(batch)
    calls: list[str] = []

    def on_sealed(source: str) -> None:
        calls.append(source)
        if len(calls) == 1:
            raise RuntimeError("queue full")

    now = [0.0]
    spool = Spool(tmp_path)
    ingestor = Ingestor(
        consumer,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        spool,
        Metrics(CollectorRegistry()),
        config,
        on_sealed=on_sealed,
        on_control=lambda c, o: None,
        clock=lambda: now[0],
        retry_initial_s=2.0,
        retry_max_s=5.0,
    )
    report = ingestor.poll_once()  # does not raise: rewinds and backs off
    assert "queue full" in report.failure and "queue full" in (ingestor.problem() or "")
    assert consumer.seeks == {TP0: 6, TP1: 3}  # the failed seal and everything not handled after it
    assert spool.sources() == ["x"] and consumer.commits == []
    consumer.batch = {TP0: batch[TP0][1:], TP1: batch[TP1]}  # fetched again ...
    assert ingestor.poll_once().backing_off  # ... but not before the back-off is over
    assert consumer.paused and calls == ["x"]
    now[0] += 2.0
    report = ingestor.poll_once()
    assert not report.failure and ingestor.problem() is None
    assert calls == ["x", "x"] and report.sealed == ["x"] and spool.sources() == ["x", "y", "z"]
    ingestor.mark_source_registered("x")
    ingestor.poll_once()
    assert consumer.commits == [{TP0: OffsetAndMetadata(7, "", 0)}]


class BrokerAway(FakeConsumer):
    """A consumer whose broker can go away: its poll returns nothing then (as kafka-python's does, reconnecting in
    the background), while commits and offset look-ups time out."""

    def __init__(self, batch: dict[TopicPartition, list[ConsumerRecord]]) -> None:
        super().__init__(batch)
        self.down = False
        self.joined = True
        self.checks = 0  # committed-offset look-ups (the ingestor's broker checks)

    def assignment(self) -> set[TopicPartition]:
        return super().assignment() if self.joined else set()

    def poll(self, timeout_ms: int) -> dict[TopicPartition, list[ConsumerRecord]]:
        return {} if self.down or not self.joined else super().poll(timeout_ms)

    def beginning_offsets(self, tps: list[TopicPartition], timeout_ms: int | None = None) -> dict[TopicPartition, int]:
        self.checks += 1
        if self.down:
            raise KafkaTimeoutError(f"Failed to get offsets by timestamps in {timeout_ms} ms")
        return super().beginning_offsets(tps, timeout_ms)

    def commit(self, offsets: dict[TopicPartition, OffsetAndMetadata], timeout_ms: int | None = None) -> None:
        if self.down:
            raise KafkaTimeoutError(f"Commit did not complete within {timeout_ms} ms")
        super().commit(offsets)


def test_a_broker_outage_is_noticed_reported_and_waited_out(tmp_path: Path, digits: SourceData) -> None:
    config = KafkaConfig(sources_topic="s", control_topic="c", dlq_topic="d")
    part = digits.subset(np.arange(10))
    chunk = encode_chunk("x", 0, part)
    record = ConsumerRecord("s", 0, 0, 5, 0, 0, chunk.key, chunk.value, chunk.headers, None, -1, -1, -1)
    consumer = BrokerAway({TP0: [record]})
    now = [0.0]
    ingestor = Ingestor(
        consumer,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        Spool(tmp_path),
        Metrics(CollectorRegistry()),
        config,
        on_sealed=lambda s: None,
        on_control=lambda c, o: None,
        clock=lambda: now[0],
        retry_initial_s=1.0,
        retry_max_s=4.0,
        broker_check_s=5.0,
    )
    # 0. joining the group (nothing assigned): the join itself talks to the broker; no check
    consumer.joined = False
    assert not ingestor.poll_once().failure and consumer.checks == 0
    consumer.joined = True
    # 1. healthy: the broker is asked once per broker_check_s, not at every poll
    assert ingestor.poll_once().records == 1 and consumer.checks == 1
    now[0] += 1.0
    assert not ingestor.poll_once().failure and consumer.checks == 1
    # 2. the broker goes away: polls return nothing and raise nothing; the next check notices
    consumer.down = True
    now[0] += 5.0
    report = ingestor.poll_once()
    assert "the broker did not answer" in report.failure and "KafkaTimeoutError" in report.failure
    assert "the broker did not answer" in (ingestor.problem() or "")
    assert ingestor.poll_once().backing_off and consumer.paused  # nothing fetched while backing off
    # 3. the chunk's source is dropped meanwhile: its record becomes committable, the commit times out (bounded)
    ingestor.mark_source_dropped("x")
    now[0] += 2.0  # the back-off is over: every poll checks again while the broker is failing
    report = ingestor.poll_once()
    assert "an offset commit" in report.failure and report.committed == {} and consumer.commits == []
    failures = consumer.checks
    # 4. the broker is back: the first poll after the back-off sees it, commits, and the problem is gone
    consumer.down = False
    now[0] += 4.0
    report = ingestor.poll_once()
    assert not report.failure and ingestor.problem() is None and consumer.checks == failures + 1
    assert report.committed == {TP0: 6} and consumer.commits == [{TP0: OffsetAndMetadata(6, "", 0)}]


# ------------------------------------------------------------------------------------------------ tests


def test_push_is_staged_sealed_and_committed_only_after_registration(
    make_harness: Callable[..., Harness], producer: KafkaProducer, config: KafkaConfig, digits: SourceData,
    tmp_path: Path,
) -> None:  # fmt: skip
    claims = tmp_path / "claims"
    h = make_harness(claim_check_root=claims, lag_interval_s=0.0)
    # paused: the consumer joins and keeps polling (membership stays) but fetches nothing
    h.ingestor.pause_all()
    h.poll_until(lambda: bool(h.consumer.assignment()))
    inline = push_source(producer, config.sources_topic, "inline", digits, chunk_size=50, progress=False)
    ref = push_source(
        producer, config.sources_topic, "by-ref", digits.subset(np.arange(30)), chunk_size=10,
        claim_check_dir=claims, inline_limit=10, progress=False,
    )  # fmt: skip
    assert (inline.chunks, inline.inline_chunks, ref.chunks, ref.ref_chunks) == (3, 3, 3, 3)
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        assert h.ingestor.poll_once(200).records == 0
    assert h.ingestor.paused

    h.ingestor.resume_all()
    reports = h.poll_until(lambda: len(h.sealed) == 2)
    assert sorted(h.sealed) == ["by-ref", "inline"]
    spool = h.spool
    assert spool.sources(SpoolState.SEALED) == ["by-ref", "inline"]
    assert fingerprint(spool.assemble("inline")) == fingerprint(digits) == inline.fingerprint
    assert fingerprint(spool.assemble("by-ref")) == ref.fingerprint
    first = inline.first_offset
    assert [c.origin.offset for c in spool.lineage("inline").chunks] == [first, first + 1, first + 2]
    assert sum(r.staged for r in reports) == 6
    assert h.metric("cdm_messages_ingested_total") == 8 and h.metric("cdm_sources_sealed_total") == 2
    assert h.ingestor.uncommitted() == 8  # every record waits for its source's registration

    # nothing is committed before the compartments are registered
    h.ingestor.poll_once(200)
    assert committed(h.consumer, config.sources_topic, inline.partition) is None
    spool.mark_registered("inline", "c-inline")
    h.ingestor.mark_source_registered("inline")
    assert committed(h.consumer, config.sources_topic, inline.partition) is None  # the poll thread commits
    h.ingestor.poll_once(200)
    assert committed(h.consumer, config.sources_topic, inline.partition) == inline.seal_offset + 1
    spool.mark_registered("by-ref", "c-ref")
    h.ingestor.mark_source_registered("by-ref")
    h.ingestor.poll_once(200)
    assert committed(h.consumer, config.sources_topic, ref.partition) == ref.seal_offset + 1
    assert h.ingestor.uncommitted() == 0
    assert h.metric("cdm_consumer_lag_messages") == 0


def test_redelivery_to_a_new_consumer_stages_nothing_new_and_still_seals(
    make_harness: Callable[..., Harness], producer: KafkaProducer, config: KafkaConfig, digits: SourceData,
    tmp_path: Path,
) -> None:  # fmt: skip
    parts = [digits.subset(np.arange(lo, lo + 40)) for lo in (0, 40, 80)]
    for seq, part in enumerate(parts):
        send(producer, config.sources_topic, encode_chunk("shoes", seq, part))
    first = make_harness()
    first.poll_until(lambda: sum(r.staged for r in first.reports) == 3)
    chunk_files = sorted((tmp_path / "spool" / "sources" / "shoes" / "chunks").iterdir())
    mtimes = [p.stat().st_mtime_ns for p in chunk_files]
    first.close()  # leaves the group; nothing was committed since the chunks await registration

    seal_origin = send(producer, config.sources_topic, encode_seal(Seal("shoes", 3, fingerprint(digits), 120)))
    second = make_harness()
    reports = second.poll_until(lambda: second.sealed == ["shoes"])
    assert sum(r.records for r in reports) == 4  # redelivered from the start
    assert sum(r.staged for r in reports) == 0 and sum(r.duplicates for r in reports) == 3
    assert [p.stat().st_mtime_ns for p in chunk_files] == mtimes  # not rewritten
    assert committed(second.consumer, config.sources_topic, seal_origin.partition) is None
    second.ingestor.mark_source_registered("shoes")
    second.ingestor.poll_once(200)
    assert committed(second.consumer, config.sources_topic, seal_origin.partition) == seal_origin.offset + 1


def npz_of(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def with_header(message: WireMessage, name: str, value: bytes | None) -> WireMessage:
    headers = [(k, v) for k, v in message.headers if k != name]
    return WireMessage(message.key, message.value, headers if value is None else [*headers, (name, value)])


def bad_messages(digits: SourceData) -> list[tuple[str, str, WireMessage]]:
    """(expected reason, "sources" | "control", message) for the ways a record is refused before the spool."""
    good = encode_chunk("bad", 0, digits.subset(np.arange(10)))
    ref = json.dumps({"uri": "file:///etc/passwd", "sha256": "0" * 64, "size": 1, "seq": 0}).encode()
    ref_headers = [("cdm-version", b"1"), ("cdm-kind", b"chunk-ref"), ("cdm-seq", b"0")]
    return [
        ("bad-version", "sources", with_header(good, "cdm-version", b"9")),
        ("bad-kind", "sources", with_header(good, "cdm-kind", b"blob")),
        ("bad-key", "sources", WireMessage(b"../etc", good.value, good.headers)),
        ("bad-header", "sources", with_header(good, "cdm-seq", None)),
        ("oversized", "sources", encode_chunk_bytes("bad", 0, b"PK" + b"\0" * MAX_MESSAGE_BYTES)),
        ("bad-npz", "sources", encode_chunk_bytes("bad", 0, b"definitely not an npz")),
        ("bad-shape", "sources", encode_chunk_bytes("bad", 0, npz_of(images=np.zeros((2, 4, 4), np.int16)))),
        ("nan", "sources", encode_chunk_bytes("bad", 0, npz_of(images=np.full((2, 4, 4), np.nan)))),
        ("hash-mismatch", "sources", with_header(good, "cdm-sha256", b"f" * 64)),
        ("bad-ref", "sources", WireMessage(b"bad", ref, [*ref_headers, ("cdm-sha256", sha256_hex(ref).encode())])),
        ("bad-json", "sources", WireMessage(b"bad", b"{not json", [("cdm-version", b"1"), ("cdm-kind", b"seal")])),
        ("missing-chunks", "sources", encode_seal(Seal("never-staged", 2, "0" * 64, 5))),
        ("too-many-chunks", "sources", encode_seal(Seal("bad", 10**9, "0" * 64, 1))),
        ("bad-json", "control", WireMessage(None, b'{"version": 1, "op": "forget-source"}')),
        ("bad-op", "control", WireMessage(None, b'{"version": 1, "op": "drop-table"}')),
        ("bad-version", "control", WireMessage(None, b'{"version": 2, "op": "retrain-router"}')),
        ("control-failed", "control", encode_control(ControlCommand(op="retrain-router", request_id="explode"))),
    ]


def read_dlq(config: KafkaConfig, expected: int) -> list[ConsumerRecord]:
    consumer = KafkaConsumer(**config.client_kwargs(), auto_offset_reset="earliest", enable_auto_commit=False)
    try:
        partitions = [TopicPartition(config.dlq_topic, p) for p in consumer.partitions_for_topic(config.dlq_topic)]
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        records: list[ConsumerRecord] = []
        deadline = time.monotonic() + 10
        while len(records) < expected and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=200).values():
                records.extend(batch)
        return records
    finally:
        consumer.close()


def expected_commits(records: dict[Origin, bool]) -> dict[int, int | None]:
    """Per partition: the offset a commit must reach given which records are committable (True)."""
    out: dict[int, int | None] = {}
    for partition in {o.partition for o in records}:
        ordered = sorted((o.offset, done) for o, done in records.items() if o.partition == partition)
        prefix = None
        for offset, done in ordered:
            if not done:
                break
            prefix = offset + 1
        out[partition] = prefix
    return out


def test_bad_records_go_to_the_dlq_with_their_reason_and_ingest_goes_on(
    make_harness: Callable[..., Harness], producer: KafkaProducer, config: KafkaConfig, digits: SourceData,
    tmp_path: Path,
) -> None:  # fmt: skip
    def on_control(command: ControlCommand, origin: Origin) -> None:
        if command.request_id == "explode":
            raise RuntimeError("router training failed: no compartments")
        h.ingestor.mark_control_done(origin)

    def decode_source(record: RecordLike) -> Chunk | Seal:
        if record.key == b"boom":  # a decoder bug on one record must not stop ingestion
            raise RecursionError("maximum recursion depth exceeded")
        return decode_source_message(record, max_value_bytes=MAX_MESSAGE_BYTES, claim_check_root=tmp_path / "claims")

    def check(source: str, data: SourceData) -> None:
        if data.labels is None:
            raise DataError(f"{source} is unlabelled and the model is class-conditional")

    h = make_harness(
        on_control=on_control,
        claim_check_root=tmp_path / "claims",
        decode_source=decode_source,
        spool_kwargs={"limits": SpoolLimits(max_source_chunks=1000), "check": check},
    )
    rejected: dict[Origin, str] = {}
    accepted: list[Origin] = []  # records that wait for their source's registration
    released: list[Origin] = []  # records of a dropped source: committable at once
    for reason, kind, message in bad_messages(digits):
        topic = config.sources_topic if kind == "sources" else config.control_topic
        rejected[send(producer, topic, message)] = reason
    # refusals by the spool: a conflicting chunk, a wrong seal, a chunk after the seal
    a, b = digits.subset(np.arange(10)), digits.subset(np.arange(10, 20))
    accepted.append(send(producer, config.sources_topic, encode_chunk("dup", 0, a)))
    rejected[send(producer, config.sources_topic, encode_chunk("dup", 0, b))] = "seq-conflict"
    rejected[send(producer, config.sources_topic, encode_seal(Seal("dup", 1, "0" * 64, 10)))] = "seal-mismatch"
    accepted.append(send(producer, config.sources_topic, encode_seal(Seal("dup", 1, fingerprint(a), 10))))
    rejected[send(producer, config.sources_topic, encode_chunk("dup", 1, b))] = "sealed"
    # a decoder crash, a seq over the limit, a source that can never train (its chunk is released at its seal)
    rejected[send(producer, config.sources_topic, encode_chunk("boom", 0, a))] = "decode-failed"
    rejected[send(producer, config.sources_topic, encode_chunk("far", 5000, a))] = "limit-exceeded"
    unlabelled = validate_arrays(a.images, None, a.ids)
    released.append(send(producer, config.sources_topic, encode_chunk("nolabels", 0, unlabelled)))
    nolabels_seal = encode_seal(Seal("nolabels", 1, fingerprint(unlabelled), 10))
    rejected[send(producer, config.sources_topic, nolabels_seal)] = "incompatible"
    # and good traffic after all of it
    report = push_source(producer, config.sources_topic, "good", digits, chunk_size=60, progress=False)
    accepted += [
        Origin(config.sources_topic, report.partition, o) for o in range(report.first_offset, report.seal_offset + 1)
    ]
    done_control = send_control(producer, config.control_topic, ControlCommand(op="forget-source", source="x"))

    h.poll_until(lambda: "good" in h.sealed and len(h.controls) == 2 and h.rejected().total() == len(rejected))
    assert sorted(h.sealed) == ["dup", "good"]
    assert h.rejected() == Counter(rejected.values())
    # every reason code a record can earn is exercised (training-failed is the worker's: test_ingest_lifecycle.py)
    assert set(rejected.values()) == set(REASONS) - {"training-failed"}

    dead = read_dlq(config, len(rejected))
    by_origin = {}
    for record in dead:
        headers = dict(record.headers)
        origin = Origin(
            headers["cdm-dlq-topic"].decode(), int(headers["cdm-dlq-partition"]), int(headers["cdm-dlq-offset"])
        )
        by_origin[origin] = headers["cdm-dlq-reason"].decode()
        assert headers["cdm-dlq-detail"]
        if by_origin[origin] == "oversized":
            assert record.value is None and int(headers["cdm-dlq-value-omitted"]) == MAX_MESSAGE_BYTES + 2
        else:
            assert record.value is not None
    assert by_origin == rejected

    # commits: dead letters and done commands are committable at once, source records after registration
    h.ingestor.poll_once(200)
    for topic, extra in [(config.sources_topic, accepted), (config.control_topic, [done_control])]:
        done = [o for o in [*rejected, *released] if o.topic == topic]
        records = {o: True for o in done} | {o: False for o in extra if o.topic == topic}
        if topic == config.control_topic:
            records[done_control] = True
        for partition, want in expected_commits(records).items():
            assert committed(h.consumer, topic, partition) == want, (topic, partition)
    h.ingestor.mark_source_registered("dup")
    h.ingestor.mark_source_registered("good")
    h.ingestor.poll_once(200)
    records = {o: True for o in [*rejected, *accepted, *released] if o.topic == config.sources_topic}
    for partition, want in expected_commits(records).items():
        assert committed(h.consumer, config.sources_topic, partition) == want


@pytest.mark.slow  # two group joins: ~10 s on Tansu
def test_revoked_partitions_commit_what_is_committable(
    make_harness: Callable[..., Harness], producer: KafkaProducer, config: KafkaConfig, digits: SourceData,
    tmp_path: Path,
) -> None:  # fmt: skip
    report = push_source(producer, config.sources_topic, "shoes", digits, chunk_size=60, progress=False)
    first = make_harness()
    first.poll_until(lambda: first.sealed == ["shoes"])
    first.ingestor._commit = lambda report=None: {}  # type: ignore[method-assign]  # only the revoke listener commits
    first.spool.mark_registered("shoes", "c-1")
    first.ingestor.mark_source_registered("shoes")
    first.ingestor.poll_once(200)
    assert committed(first.consumer, config.sources_topic, report.partition) is None
    owned = len(first.consumer.assignment())

    # a second replica (its own spool) joins, polling in its own thread: the first one's partitions are revoked
    second = make_harness(spool="spool-2")
    stop = threading.Event()

    def run_second() -> None:
        while not stop.is_set():
            second.ingestor.poll_once(200)

    thread = threading.Thread(target=run_second)
    thread.start()
    try:
        first.poll_until(lambda: 0 < len(first.consumer.assignment()) < owned)
    finally:
        stop.set()
        thread.join()
    assert committed(first.consumer, config.sources_topic, report.partition) == report.seal_offset + 1
    assert first.sealed == ["shoes"]  # nothing re-announced
    assert second.metric("cdm_messages_ingested_total") == 0  # nothing redelivered: offsets were committed
