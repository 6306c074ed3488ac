"""Ingest reliability against the real broker (issue 8): a bad record or a failing disk, broker or dead-letter
topic never stops ingestion; a source is never idle-sealed while ingest is paused or behind."""

from __future__ import annotations

import errno
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from kafka import KafkaProducer
from kafka.errors import KafkaTimeoutError

import daemon.ingest
import daemon.spool
from cdm.data import SourceData, fingerprint
from daemon.config import AppConfig, DaemonConfig, KafkaConfig
from daemon.jobs import Jobs
from daemon.wire import Origin, RecordLike, Seal, WireMessage, encode_chunk, encode_chunk_bytes, encode_seal
from tests.daemon import test_ingest as base
from tests.daemon.test_ingest import Harness, committed, read_dlq, send

pytestmark = pytest.mark.services

# the real-broker fixtures of test_ingest.py
config = base.config
producer = base.producer
make_harness = base.make_harness
digits = base.digits


def push_chunks(to: KafkaProducer, topic: str, source: str, parts: list[SourceData], first: int = 0) -> list[Origin]:
    return [send(to, topic, encode_chunk(source, first + i, part)) for i, part in enumerate(parts)]


def test_a_decoder_crash_is_dead_lettered_and_ingest_goes_on(
    make_harness: Callable[..., Harness], producer: KafkaProducer, config: KafkaConfig, digits: SourceData,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    real = daemon.ingest.decode_source_message
    crashes = {b"deep": RecursionError("maximum recursion depth exceeded"), b"huge": MemoryError()}

    def decoder(record: RecordLike, **kwargs: Any) -> Any:
        if record.key in crashes:
            raise crashes[record.key]
        return real(record, **kwargs)

    monkeypatch.setattr(daemon.ingest, "decode_source_message", decoder)
    part = digits.subset(np.arange(10))
    bad = [send(producer, config.sources_topic, encode_chunk(k.decode(), 0, part)) for k in crashes]
    good = push_chunks(producer, config.sources_topic, "good", [part])
    good.append(send(producer, config.sources_topic, encode_seal(Seal("good", 1, fingerprint(part), 10))))
    h = make_harness()
    h.poll_until(lambda: h.sealed == ["good"])
    assert h.rejected() == {"decode-failed": 2}
    dead = read_dlq(config, 2)
    assert sorted(dict(r.headers)["cdm-dlq-detail"].decode().split(":")[0] for r in dead) == [
        "the decoder raised MemoryError",
        "the decoder raised RecursionError",
    ]
    h.ingestor.mark_source_registered("good")
    h.ingestor.poll_once(200)
    for o in [*bad, *good]:  # everything on these partitions is committed: nothing is read again
        assert (committed(h.consumer, o.topic, o.partition) or 0) > o.offset


def test_a_full_disk_while_staging_backs_off_and_retries_without_losing_a_record(
    make_harness: Callable[..., Harness], producer: KafkaProducer, config: KafkaConfig, digits: SourceData,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    real = daemon.spool.write_atomic
    failures = [3]

    def full_disk(path: Path, data: bytes) -> None:
        if failures[0] > 0 and path.suffix == ".npz":
            failures[0] -= 1
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data)

    monkeypatch.setattr(daemon.spool, "write_atomic", full_disk)
    parts = [digits.subset(np.arange(lo, lo + 40)) for lo in (0, 40, 80)]
    push_chunks(producer, config.sources_topic, "shoes", parts)
    send(producer, config.sources_topic, encode_seal(Seal("shoes", 3, fingerprint(digits), 120)))
    h = make_harness()
    reports = h.poll_until(lambda: h.sealed == ["shoes"], timeout_s=60)
    failed = [r.failure for r in reports if r.failure]
    assert len(failed) == 3 and all("No space left on device" in f for f in failed)
    assert any(r.backing_off for r in reports)
    assert h.metric("cdm_ingest_failures_total", kind="record") == 3
    assert h.ingestor.problem() is None  # recovered
    assert fingerprint(h.spool.assemble("shoes")) == fingerprint(digits)
    assert sum(r.staged for r in reports) == 3 and h.rejected() == {}


def test_a_dead_letter_the_broker_does_not_acknowledge_is_sent_again(
    make_harness: Callable[..., Harness], producer: KafkaProducer, config: KafkaConfig, digits: SourceData,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    real_send = KafkaProducer.send
    refusals = [2]

    def flaky_send(self: KafkaProducer, topic: str, *args: Any, **kwargs: Any) -> Any:
        if topic == config.dlq_topic and refusals[0] > 0:
            refusals[0] -= 1
            raise KafkaTimeoutError("Failed to update metadata after 60.0 secs.")
        return real_send(self, topic, *args, **kwargs)

    monkeypatch.setattr(KafkaProducer, "send", flaky_send)
    bad = send(producer, config.sources_topic, encode_chunk_bytes("bad", 0, b"not an npz"))
    h = make_harness()
    reports = h.poll_until(lambda: h.rejected().total() > 0 and h.ingestor.problem() is None and refusals[0] == 0)
    h.poll_until(lambda: committed(h.consumer, bad.topic, bad.partition) == bad.offset + 1)
    assert sum(1 for r in reports if r.failure) == 2
    assert h.metric("cdm_ingest_failures_total", kind="dlq") == 2
    dead = read_dlq(config, 1)
    assert len(dead) == 1 and dict(dead[0].headers)["cdm-dlq-reason"] == b"bad-npz"


def test_a_dead_letter_copy_too_large_for_the_producer_is_still_sent(
    make_harness: Callable[..., Harness], producer: KafkaProducer, config: KafkaConfig, digits: SourceData,
) -> None:  # fmt: skip
    plain = encode_chunk_bytes("bad", 0, b"not an npz")
    foreign = [(f"x-trace-{i}", b"v" * 1000) for i in range(80)]  # 80 kB of foreign headers > 64 KiB
    message = WireMessage(plain.key, plain.value, [*plain.headers, *foreign])
    bad = send(producer, config.sources_topic, message)
    # a keyless control record whose value is over the limit: its copy would have neither key nor value
    keyless = send(producer, config.control_topic, WireMessage(None, b"x" * 70_000))
    good = digits.subset(np.arange(10))
    send(producer, config.sources_topic, encode_chunk("good", 0, good))
    send(producer, config.sources_topic, encode_seal(Seal("good", 1, fingerprint(good), 10)))
    h = make_harness()
    h.poll_until(lambda: h.sealed == ["good"] and h.rejected().total() == 2)
    assert h.rejected() == {"bad-npz": 1, "oversized": 1} and h.ingestor.problem() is None
    dead = {dict(r.headers)["cdm-dlq-reason"]: r for r in read_dlq(config, 2)}
    headers = dict(dead[b"bad-npz"].headers)
    assert int(headers["cdm-dlq-offset"]) == bad.offset
    # the 80 foreign headers are left out first (daemon.wire.encode_dlq); the value then fits and is kept
    assert dead[b"bad-npz"].value == b"not an npz" and "cdm-dlq-headers-omitted" in headers
    assert not any(k.startswith("x-trace-") for k in headers)
    headers = dict(dead[b"oversized"].headers)
    assert int(headers["cdm-dlq-offset"]) == keyless.offset and headers["cdm-dlq-value-omitted"] == b"70000"
    h.poll_until(lambda: committed(h.consumer, keyless.topic, keyless.partition) == keyless.offset + 1)


def test_a_half_fetched_source_is_not_idle_sealed_while_ingest_is_paused(
    make_harness: Callable[..., Harness], producer: KafkaProducer, config: KafkaConfig, digits: SourceData,
) -> None:  # fmt: skip
    """Default config (source_idle_seal_s = 30): training pauses ingest for longer than that, the rest of the
    source waits in the broker; the producer's own seal is accepted once ingest resumes."""
    cfg = AppConfig()
    assert cfg.daemon.source_idle_seal_s == DaemonConfig().source_idle_seal_s == 30.0
    now = [0.0]  # the idle clock (injected); the broker, the spool and the idle-seal job are real
    h = make_harness(spool_kwargs={"monotonic": lambda: now[0]})
    submitted: list[Any] = []
    jobs = Jobs(  # the idle-seal job needs only the spool, the metrics, [daemon] and the worker's queue
        spool=h.spool,
        worker=SimpleNamespace(submit=submitted.append),  # type: ignore[arg-type]
        registry=None,  # type: ignore[arg-type]
        coordinator=None,  # type: ignore[arg-type]
        metrics=h.metrics,
        daemon=cfg.daemon,
        daemon_id="test",
        heartbeat=lambda: None,
    )
    parts = [digits.subset(np.arange(lo, lo + 20)) for lo in range(0, 120, 20)]
    push_chunks(producer, config.sources_topic, "half", parts[:3])
    h.poll_until(lambda: len(h.spool.lineage("half").chunks) == 3 if h.spool.state("half") else False, 60)
    for _ in range(3):
        h.ingestor.poll_once(200)  # caught up: the idle clock runs ...
    now[0] += 10
    jobs.seal_idle_sources()
    assert h.spool.state("half") == "staged"

    h.ingestor.pause_all()  # ... a compartment starts training
    h.ingestor.poll_once(200)
    push_chunks(producer, config.sources_topic, "half", parts[3:], first=3)
    seal = Seal("half", 6, fingerprint(digits), 120)
    send(producer, config.sources_topic, encode_seal(seal))
    for _ in range(5):  # training takes minutes; ingest keeps polling (paused) to stay in the group
        now[0] += 60
        h.ingestor.poll_once(200)
        jobs.seal_idle_sources()
        assert h.spool.state("half") == "staged" and submitted == []

    h.ingestor.resume_all()  # training done
    h.poll_until(lambda: h.sealed == ["half"], 60)
    assert h.spool.lineage("half").seal == seal  # the producer's seal, all 6 chunks: no truncated prefix
    assert h.rejected() == {} and submitted == []
    # and an abandoned push is still sealed after 30 s of live, caught-up quiet
    push_chunks(producer, config.sources_topic, "abandoned", parts[:2])
    h.poll_until(lambda: h.spool.state("abandoned") is not None and len(h.spool.lineage("abandoned").chunks) == 2, 60)
    h.ingestor.poll_once(200)
    now[0] += 29
    jobs.seal_idle_sources()
    assert submitted == []
    now[0] += 2
    jobs.seal_idle_sources()
    assert [j.source for j in submitted] == ["abandoned"] and h.spool.state("abandoned") == "sealed"
