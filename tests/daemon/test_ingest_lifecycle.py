"""Ingest's side of the lifecycle against the real broker and Redis: registry tombstones are honoured before
staging, and what the worker gives up on is dead-lettered and its offsets released (issue 8, items 6 and 9)."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import pytest
import redis
from kafka import KafkaProducer

from cdm.data import SourceData, fingerprint
from cdm.lifecycle import Tombstone
from daemon.catalogue import tombstone_of
from daemon.config import KafkaConfig
from daemon.producer import push_source
from daemon.wire import ControlCommand, Origin, Seal, encode_chunk, encode_control, encode_seal
from registry.keys import Keys
from registry.writer import Registry
from tests.daemon import test_ingest as base
from tests.daemon.test_ingest import Harness, committed, read_dlq, send

pytestmark = pytest.mark.services

config = base.config
producer = base.producer
make_harness = base.make_harness
digits = base.digits


def registry_tombstones(redis_client: redis.Redis, namespace: str) -> Callable[[str], Tombstone | None]:
    """What the service passes to the ingestor: the registry's tombstone of a source."""
    registry = Registry(redis_client, Keys(namespace))

    def tombstone(source: str) -> Tombstone | None:
        record = registry.tombstone(source)
        return tombstone_of(record) if record is not None else None

    return tombstone


def test_records_older_than_the_registry_tombstone_are_ignored_and_committed(
    make_harness: Callable[..., Harness], producer: KafkaProducer, config: KafkaConfig, digits: SourceData,
    redis_client: redis.Redis, redis_namespace: str,
) -> None:  # fmt: skip
    """Another replica forgot "gone" while these records of it were still in Kafka (produced before the forget,
    consumed after): they are not staged as a new source. A push after the forget is a new source."""
    registry = Registry(redis_client, Keys(redis_namespace))
    before_forget = int(time.time() * 1000) - 5_000
    part = digits.subset(np.arange(40))
    sent = [
        producer.send(config.sources_topic, key=m.key, value=m.value, headers=m.headers, timestamp_ms=before_forget)
        for m in (encode_chunk("gone", 0, part), encode_seal(Seal("gone", 1, fingerprint(part), 40)))
    ]
    metadata = [f.get(10) for f in sent]
    partition, last = metadata[0].partition, max(md.offset for md in metadata)
    registry.forget_source("gone", request_id="forget-gone")  # on another replica: no offsets of it known here
    h = make_harness(tombstone=registry_tombstones(redis_client, redis_namespace))
    # ignored, and committed at once (nothing waits for them)
    h.poll_until(lambda: (committed(h.consumer, config.sources_topic, partition) or 0) > last)
    assert h.spool.state("gone") is None and h.sealed == [] and h.rejected() == {}
    # a push of the same id after the forget is a new source
    again = push_source(producer, config.sources_topic, "gone", part, chunk_size=40, progress=False)
    h.poll_until(lambda: h.sealed == ["gone"])
    assert [c.origin.offset for c in h.spool.lineage("gone").chunks] == [again.first_offset]


def test_a_source_the_worker_gave_up_is_dead_lettered_as_training_failed_and_released(
    make_harness: Callable[..., Harness], producer: KafkaProducer, config: KafkaConfig, digits: SourceData
) -> None:
    h = make_harness()
    pushed = push_source(producer, config.sources_topic, "doomed", digits, chunk_size=60, progress=False)
    h.poll_until(lambda: h.sealed == ["doomed"])
    assert committed(h.consumer, config.sources_topic, pushed.partition) is None
    h.ingestor.mark_training_failed("doomed", "train failed 5 times; last error: ConnectionError: gone")
    h.poll_until(lambda: committed(h.consumer, config.sources_topic, pushed.partition) == pushed.seal_offset + 1)
    (dead,) = read_dlq(config, 1)
    headers = dict(dead.headers)
    assert headers["cdm-dlq-reason"] == b"training-failed" and b"ConnectionError" in headers["cdm-dlq-detail"]
    assert int(headers["cdm-dlq-offset"]) == pushed.seal_offset and headers["cdm-kind"] == b"seal"
    assert dead.key == b"doomed" and dead.value is not None and fingerprint(digits).encode() in dead.value
    assert h.rejected() == {"training-failed": 1}
    assert h.spool.state("doomed") is None and h.ingestor.uncommitted() == 0
    # a redelivery of its records is ignored (the spool's tombstone); a new push of the id is a new source
    assert h.spool.forgotten("doomed", Origin(config.sources_topic, pushed.partition, pushed.seal_offset))
    push_source(producer, config.sources_topic, "doomed", digits.subset(np.arange(30)), chunk_size=30, progress=False)
    h.poll_until(lambda: h.sealed == ["doomed", "doomed"] and h.spool.state("doomed") == "sealed")


def test_a_control_command_the_worker_gave_up_is_dead_lettered_as_control_failed(
    make_harness: Callable[..., Harness], producer: KafkaProducer, config: KafkaConfig
) -> None:
    h = make_harness()
    origin = send(producer, config.control_topic, encode_control(ControlCommand(op="retrain-router")))
    h.poll_until(lambda: len(h.controls) == 1)
    assert h.controls[0][1] == origin and h.ingestor.uncommitted() == 1
    h.ingestor.mark_control_failed(origin, "retrain-router failed 5 times; last error: OSError: disk")
    h.poll_until(lambda: committed(h.consumer, origin.topic, origin.partition) == origin.offset + 1)
    (dead,) = read_dlq(config, 1)
    headers = dict(dead.headers)
    assert headers["cdm-dlq-reason"] == b"control-failed" and int(headers["cdm-dlq-offset"]) == origin.offset
    assert h.rejected() == {"control-failed": 1}
