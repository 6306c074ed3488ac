"""Kafka side of the daemon: sources and control records -> spool, callbacks, dead-letter topic, offsets.

One thread calls :meth:`Ingestor.poll_once` in a loop (it also keeps the group membership alive while
training runs elsewhere: :meth:`Ingestor.pause_all` stops fetching without leaving the group). Other threads
report finished work with :meth:`Ingestor.mark_source_registered`, :meth:`Ingestor.mark_control_done` and
:meth:`Ingestor.mark_source_dropped`; offsets are committed by the polling thread only, and never past a
record whose effect is not durable yet:

* chunk and seal records of a source: once the source's compartment is registered (or the source dropped);
* dead-lettered records: once the dead-letter topic acknowledged the copy;
* control records: once the command completed (or was dead-lettered after failing, ``control-failed``);
* records ignored because their source was forgotten: at once. A source record is forgotten when this
  replica's spool dropped its source at or after its offset, or when the registry's tombstone of the source
  (written by whichever replica ran the forget) is newer than the record's timestamp or covers its offset;
* records of a source that failed to train ``daemon.job_max_attempts`` times: once its seal's copy is in the
  dead-letter topic (``training-failed``) and the source is dropped from the spool.

The commit per partition is the contiguous prefix of such records. Redeliveries (after a crash or a
rebalance) are harmless because the spool stages idempotently.

Failures never stop the loop. A record that cannot be decoded or accepted is dead-lettered with a reason
(an unexpected exception from a decoder too: ``decode-failed``). Only infrastructure failures (the broker,
spool I/O such as a full disk, a dead-letter copy the broker did not acknowledge, a failing callback) rewind
the unhandled records and back off (exponentially, bounded); :meth:`Ingestor.problem` reports the failure
while it lasts. Shutdown signals (``daemon.errors.ShutdownRequested``/``ColdShutdown``) propagate.

A consumer's poll does not fail while the broker is away (it returns nothing and reconnects in the background),
so every ``broker_check_s`` the loop asks the broker for the first offset of an assigned partition (one bounded
round trip); a check that fails is a broker failure like the others (backing off, reported by ``problem()``), and
while it lasts every poll checks again, so the recovery is seen at once. Commits wait at most ``broker_check_s``
too: the loop never hangs on a broker that is away.

After every poll the ingestor tells the spool which source partitions are live (fetching, caught up with the
fetch high watermark): a source's idle-seal clock runs only then (see ``daemon.spool``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from kafka import KafkaConsumer, KafkaProducer
from kafka.consumer.subscription_state import AsyncConsumerRebalanceListener
from kafka.errors import (
    CoordinatorNotAvailableError,
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    NodeNotReadyError,
)
from kafka.structs import OffsetAndMetadata, TopicPartition

from cdm.lifecycle import Tombstone
from common.redact import safe
from daemon.metrics import Metrics
from daemon.spool import Spool, SpoolError, SpoolState
from daemon.wire import (
    DEFAULT_MAX_CHUNKS,
    DEFAULT_MAX_DECODED_BYTES,
    H_DLQ_DETAIL,
    H_DLQ_OFFSET,
    H_DLQ_PARTITION,
    H_DLQ_REASON,
    H_DLQ_TOPIC,
    H_DLQ_VALUE_OMITTED,
    Chunk,
    ControlCommand,
    Origin,
    RecordLike,
    Seal,
    WireError,
    WireMessage,
    decode_source_message,
    encode_dlq,
    encode_seal,
)
from daemon.wire import decode_control as decode_control_default

log = logging.getLogger(__name__)

# what a call to the broker raises when the broker cannot be reached (not a refusal: a rebalance, a bad request)
BROKER_AWAY = (KafkaTimeoutError, KafkaConnectionError, NodeNotReadyError, CoordinatorNotAvailableError)


class IngestConfig(Protocol):
    """The fields of ``daemon.config.KafkaConfig`` the ingestor reads."""

    @property
    def sources_topic(self) -> str: ...
    @property
    def control_topic(self) -> str: ...
    @property
    def dlq_topic(self) -> str: ...
    @property
    def max_message_bytes(self) -> int: ...


# What an uncommitted record waits for: ("source", name) | ("control", origin) | ("dlq", origin).
WaitKey = tuple[str, Any]


@dataclass
class _Entry:
    offset: int
    leader_epoch: int
    wait: WaitKey | None  # None: committable


class OffsetTracker:
    """Consumed records per partition, in order, each waiting for something or done.

    Not thread-safe on its own; the :class:`Ingestor` guards it with its lock.
    """

    def __init__(self) -> None:
        self._entries: dict[TopicPartition, deque[_Entry]] = {}
        self._ready: dict[TopicPartition, OffsetAndMetadata] = {}  # advanced but not yet committed

    def add(self, tp: TopicPartition, offset: int, leader_epoch: int, wait: WaitKey | None) -> None:
        self._entries.setdefault(tp, deque()).append(_Entry(offset, leader_epoch, wait))

    def release(self, wait: WaitKey) -> int:
        """Mark every record waiting for ``wait`` done; returns how many."""
        n = 0
        for entries in self._entries.values():
            for entry in entries:
                if entry.wait == wait:
                    entry.wait = None
                    n += 1
        return n

    def rewait(self, tp: TopicPartition, offset: int, wait: WaitKey) -> None:
        """Change what a tracked record waits for (a control command that failed goes to the DLQ)."""
        for entry in self._entries.get(tp, ()):
            if entry.offset == offset:
                entry.wait = wait

    def committable(
        self, partitions: Iterable[TopicPartition] | None = None
    ) -> dict[TopicPartition, OffsetAndMetadata]:
        """Advance over each partition's done prefix; the offsets to commit (next offset to read)."""
        for tp in list(self._entries if partitions is None else partitions):
            entries = self._entries.get(tp)
            last: _Entry | None = None
            while entries and entries[0].wait is None:
                last = entries.popleft()
            if last is not None:
                self._ready[tp] = OffsetAndMetadata(last.offset + 1, "", last.leader_epoch)
        return {tp: om for tp, om in self._ready.items() if partitions is None or tp in partitions}

    def committed(self, offsets: dict[TopicPartition, OffsetAndMetadata]) -> None:
        """Forget ready offsets that were committed (unless they advanced meanwhile)."""
        for tp, om in offsets.items():
            if self._ready.get(tp) == om:
                del self._ready[tp]

    def truncate(self, tp: TopicPartition, offset: int) -> None:
        """Drop the records of ``tp`` from ``offset`` on (they were rewound and will be consumed again)."""
        entries = self._entries.get(tp)
        while entries and entries[-1].offset >= offset:
            entries.pop()

    def forget(self, partitions: Iterable[TopicPartition]) -> None:
        """Drop all state of partitions this consumer no longer owns."""
        for tp in partitions:
            self._entries.pop(tp, None)
            self._ready.pop(tp, None)

    def pending(self) -> int:
        return sum(1 for entries in self._entries.values() for e in entries if e.wait is not None)


@dataclass
class PollReport:
    """What one :meth:`Ingestor.poll_once` did."""

    records: int = 0
    staged: int = 0  # chunks newly staged
    duplicates: int = 0  # chunks/seals already in the spool (redeliveries)
    sealed: list[str] = field(default_factory=list)  # sources handed to on_sealed
    controls: int = 0  # control commands handed to on_control
    rejected: dict[str, int] = field(default_factory=dict)  # reason -> records dead-lettered
    committed: dict[TopicPartition, int] = field(default_factory=dict)  # next offset committed per partition
    failure: str = ""  # an infrastructure failure in this poll (records rewound, backing off)
    backing_off: bool = False  # this poll only waited out a back-off (nothing fetched)


class _RebalanceListener(AsyncConsumerRebalanceListener):
    """Runs on kafka-python's IO thread; blocking consumer calls are not allowed there, so it awaits."""

    def __init__(self, ingestor: Ingestor) -> None:
        self._ingestor = ingestor

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        if not revoked:
            return
        ing = self._ingestor
        with ing._lock:
            offsets = ing._tracker.committable(revoked)
            ing._tracker.forget(revoked)
        if offsets:
            try:
                await ing._consumer.commit_async(offsets)
                log.info("committed %s before giving up partitions", _fmt(offsets))
            except Exception as exc:  # the next owner re-reads them; the spool makes that harmless
                log.warning("commit before revoking %s failed (%s); records will be redelivered", revoked, exc)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        ing = self._ingestor
        log.info("assigned %s", sorted(assigned))
        if ing._paused and assigned:
            ing._consumer.pause(*assigned)

    async def on_partitions_lost(self, lost: set[TopicPartition]) -> None:
        log.warning("lost partitions %s (evicted from the group); their records will be redelivered", lost)
        with self._ingestor._lock:
            self._ingestor._tracker.forget(lost)


def _fmt(offsets: dict[TopicPartition, OffsetAndMetadata]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]={om.offset}" for tp, om in sorted(offsets.items()))


class Ingestor:
    """Consumes ``sources_topic`` and ``control_topic`` into the spool and the daemon's callbacks.

    Args:
        consumer: a KafkaConsumer with ``group_id``, ``enable_auto_commit=False`` and
            ``auto_offset_reset="earliest"``, no deserializers, not yet subscribed (the ingestor subscribes).
        dlq_producer: a KafkaProducer (bytes key/value) for the dead-letter topic; its ``max_request_size``
            must exceed ``config.max_message_bytes`` plus headers.
        spool: where chunks are staged.
        metrics: the daemon's metrics (messages/bytes ingested, dead letters by reason, sources sealed, lag).
        config: topic names and the record size limit (see :class:`IngestConfig`).
        on_sealed: called (on the polling thread) once per source when its seal is verified; it should only
            enqueue the training, and later call :meth:`mark_source_registered`.
        on_control: called (on the polling thread) with each valid control command and its origin; the
            daemon calls :meth:`mark_control_done` with that origin when the command completed. An exception
            dead-letters the record as ``control-failed``.
        clock: monotonic seconds (lag reporting rate, back-off).
        claim_check_root: directory claim-check files must live in; None refuses chunk-ref records.
        max_ref_bytes: largest claim-check file read.
        max_decoded_bytes: largest uncompressed size of one chunk's arrays (a bigger one is ``oversized``).
        max_chunks_per_source: a seal announcing more chunks, or a cdm-seq not below it, is ``too-many-chunks``.
        lag_interval_s: at most one consumer-lag measurement per this many seconds.
        dlq_timeout_s: how long to wait for the dead-letter topic to acknowledge.
        retry_initial_s, retry_max_s: back-off after an infrastructure failure: the first wait, doubled per
            consecutive failure up to the second.
        broker_check_s: seconds between two checks that the broker answers, and the longest one
            may take.
        decode_source, decode_control: the record decoders (default: ``daemon.wire``'s with the limits above);
            any exception they raise dead-letters the record (WireError with its reason, others as
            ``decode-failed``).
        tombstone: the registry's tombstone of a source (None: never forgotten); a source record it covers is
            ignored and committed. A failure to read it is an infrastructure failure (rewind, back off).
    """

    def __init__(
        self,
        consumer: KafkaConsumer,
        dlq_producer: KafkaProducer,
        spool: Spool,
        metrics: Metrics,
        config: IngestConfig,
        on_sealed: Callable[[str], None],
        on_control: Callable[[ControlCommand, Origin], None],
        clock: Callable[[], float] = time.monotonic,
        *,
        claim_check_root: Path | None = None,
        max_ref_bytes: int = 1 << 30,
        max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
        max_chunks_per_source: int = DEFAULT_MAX_CHUNKS,
        lag_interval_s: float = 15.0,
        dlq_timeout_s: float = 30.0,
        retry_initial_s: float = 0.5,
        retry_max_s: float = 30.0,
        broker_check_s: float = 5.0,
        decode_source: Callable[[RecordLike], Chunk | Seal] | None = None,
        decode_control: Callable[[RecordLike], ControlCommand] | None = None,
        tombstone: Callable[[str], Tombstone | None] | None = None,
    ) -> None:
        if consumer.config.get("enable_auto_commit"):
            raise ValueError("the ingest consumer must have enable_auto_commit=False (it commits durable work only)")
        if consumer.config.get("group_id") is None:
            raise ValueError("the ingest consumer needs a group_id (offsets are committed to the group)")
        self._consumer = consumer
        self._dlq = dlq_producer
        self._spool = spool
        self._metrics = metrics
        self._config = config
        self._on_sealed = on_sealed
        self._on_control = on_control
        self._clock = clock
        self._claim_check_root = claim_check_root
        self._max_ref_bytes = max_ref_bytes
        self._max_decoded_bytes = max_decoded_bytes
        self._max_chunks_per_source = max_chunks_per_source
        self._lag_interval_s = lag_interval_s
        self._dlq_timeout_s = dlq_timeout_s

        self._lock = threading.Lock()  # guards the tracker and the sets below
        self._tracker = OffsetTracker()
        self._registered: set[str] = set()
        self._announced: set[str] = set()  # sources handed to on_sealed by this ingestor
        self._dlq_inflight: list[tuple[Origin, Any, WireMessage, str]] = []
        self._want_paused = False  # set by any thread, applied by the polling thread
        self._paused = False  # what is applied (read by the rebalance listener)
        self._started = False
        self._next_lag = 0.0
        self._decode_source = decode_source or self._decode_source_default
        self._decode_control = decode_control or decode_control_default
        self._retry_initial_s = retry_initial_s
        self._retry_max_s = retry_max_s
        self._failures = 0  # consecutive infrastructure failures
        self._retry_at = 0.0  # clock() before which nothing is fetched
        self._problem: str | None = None  # the last infrastructure failure, until a poll succeeds
        self._failure_kind = ""  # "record" | "poll" | "dlq" | "broker"
        self._broker_check_s = broker_check_s
        self._next_broker_check = 0.0  # clock() of the next check that the broker answers
        self._dlq_retry: list[tuple[Origin, WireMessage, str]] = []  # copies to send again (origin, message, reason)
        self._tombstone = tombstone
        self._failed_sources: list[tuple[str, str]] = []  # (source, why) given up by the worker, to dead-letter
        self._failed_controls: list[tuple[Origin, str]] = []  # (control record, why) given up by the worker
        spool.add_drop_listener(self.mark_source_dropped)

    # ------------------------------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Subscribe, and hand sealed-but-unregistered spool sources (from before a restart) to on_sealed."""
        if self._started:
            return
        self._consumer.subscribe(
            [self._config.sources_topic, self._config.control_topic], listener=_RebalanceListener(self)
        )
        self._started = True
        for source in self._spool.sources(SpoolState.SEALED):
            self._announce(source)

    def close(self) -> None:
        """Wait for dead-letter acknowledgements and commit what is committable.

        Closing the consumer (which leaves the group) and the producer stays the caller's.
        """
        self._await_dead_letters(PollReport())
        self._commit()

    def pause_all(self) -> None:
        """Stop fetching (applied at the next poll); keep polling so the group membership stays."""
        self._want_paused = True

    def resume_all(self) -> None:
        """Fetch again (applied at the next poll)."""
        self._want_paused = False

    @property
    def paused(self) -> bool:
        return self._paused

    # ------------------------------------------------------------------------------------------- completions

    def mark_source_registered(self, source: str) -> None:
        """The compartment of ``source`` is registered: its chunk and seal records become committable."""
        with self._lock:
            self._registered.add(source)
            self._tracker.release(("source", source))

    def mark_source_dropped(self, source: str) -> None:
        """``source`` was dropped from the spool (forgotten): its records become committable, and a later
        push of the same id is a new source."""
        with self._lock:
            self._registered.discard(source)
            self._announced.discard(source)
            self._tracker.release(("source", source))

    def mark_control_done(self, origin: Origin) -> None:
        """The control command read at ``origin`` completed: its record becomes committable."""
        with self._lock:
            self._tracker.release(("control", Origin(*origin)))

    def mark_training_failed(self, source: str, detail: str) -> None:
        """(Any thread.) ``source`` failed to train for good: at the next poll its seal is dead-lettered as
        ``training-failed``, then the source is dropped from the spool, which releases its records."""
        with self._lock:
            self._failed_sources.append((source, detail))

    def mark_control_failed(self, origin: Origin, detail: str) -> None:
        """(Any thread.) The control command read at ``origin`` failed for good: at the next poll a copy naming it
        is dead-lettered as ``control-failed`` and the record becomes committable once that is acknowledged."""
        with self._lock:
            self._failed_controls.append((Origin(*origin), detail))

    # ------------------------------------------------------------------------------------------- polling

    def problem(self) -> str | None:
        """The infrastructure failure the loop is backing off from (for readiness), or None when healthy."""
        return self._problem

    def poll_once(self, timeout_ms: int = 1000) -> PollReport:
        """Fetch and handle one batch, dead-letter rejects, commit what became committable, report lag.

        Never raises for a bad record or an infrastructure failure (see the module docstring); only shutdown
        signals and other BaseExceptions propagate (after rewinding the unhandled records).
        """
        self.start()
        report = PollReport()
        wait_s = self._retry_at - self._clock()
        if wait_s > 0:  # backing off: keep the group membership, fetch nothing
            report.backing_off = True
            self._apply_pause(force=True)
            self._poll(report, min(timeout_ms, max(1, int(wait_s * 1000))))
            report.committed = self._commit(report)
            self._spool.set_live_partitions(())
            return report
        if self._dlq_retry:
            self._resend_dead_letters(report)
        if not report.failure:
            self._dead_letter_given_up(report)
        if not report.failure:
            self._apply_pause()
            batches = self._poll(report, timeout_ms)
            self._handle_batches(batches, report)
        self._await_dead_letters(report)
        report.committed = self._commit(report)
        broker_answered = self._check_broker(report) if not report.failure else None
        self._report_lag()
        self._spool.set_live_partitions(() if report.failure else self._live_partitions())
        if self._failure_kind == "record":
            recovered = bool(report.records)  # the rewound record was handled this time
        elif self._failure_kind == "broker":
            recovered = bool(broker_answered)
        else:
            recovered = True
        if not report.failure and recovered:
            if self._problem is not None:
                log.info("ingest recovered from: %s", self._problem)
            self._failures, self._problem, self._failure_kind = 0, None, ""
        return report

    def _poll(self, report: PollReport, timeout_ms: int) -> dict[TopicPartition, list[Any]]:
        try:
            return self._consumer.poll(timeout_ms=timeout_ms)
        except KafkaError as exc:
            self._infra_failure("poll", f"polling the broker failed: {type(exc).__name__}: {exc}", report)
            return {}

    def _check_broker(self, report: PollReport) -> bool | None:
        """Ask the broker for the first offset of one assigned partition (a ListOffsets round trip to its leader,
        apart from the group protocol), every ``broker_check_s`` (every poll while the broker is failing). True: it
        answered; False: it did not (an infrastructure failure); None: not checked now (also while nothing is
        assigned: the group join itself talks to the broker then)."""
        now = self._clock()
        if now < self._next_broker_check and self._failure_kind != "broker":
            return None
        assigned = sorted(self._consumer.assignment())
        if not assigned:
            return None
        self._next_broker_check = now + self._broker_check_s
        try:
            self._consumer.beginning_offsets(assigned[:1], timeout_ms=max(1, int(self._broker_check_s * 1000)))
        except KafkaError as exc:
            self._infra_failure(
                "broker", f"the broker did not answer (within {self._broker_check_s:g}s): {exc!r}", report
            )
            return False
        return True

    def _handle_batches(self, batches: dict[TopicPartition, list[Any]], report: PollReport) -> None:
        for tp, records in batches.items():
            for i, record in enumerate(records):
                report.records += 1
                try:
                    self._handle(record, report)
                except Exception as exc:
                    # Not a bad record (those are dead-lettered in _handle) but a failure here: spool I/O (disk
                    # full), a callback. Rewind the unhandled records so they are fetched again, never skipped
                    # by a later commit, and back off before fetching them again.
                    log.exception("handling %s failed; rewinding and backing off", Origin.of(record))
                    self._rewind(batches, failed=(tp, i))
                    self._infra_failure(
                        "record", f"handling {Origin.of(record)} failed: {type(exc).__name__}: {exc}", report
                    )
                    return
                except BaseException:
                    self._rewind(batches, failed=(tp, i))
                    raise

    def _infra_failure(self, kind: str, what: str, report: PollReport) -> None:
        self._failures += 1
        delay = min(self._retry_max_s, self._retry_initial_s * 2 ** min(self._failures - 1, 30))
        self._retry_at = self._clock() + delay
        self._problem = safe(f"{what} (failure {self._failures} in a row; retrying in {delay:.1f}s)")
        self._failure_kind = kind
        report.failure = self._problem
        self._metrics.ingest_failures.labels(kind=kind).inc()
        log.warning("ingest: %s", self._problem)

    def _rewind(self, batches: dict[TopicPartition, list[Any]], *, failed: tuple[TopicPartition, int]) -> None:
        """Seek back to the failed record and to every record after it in the batch (handled in dict order)."""
        order = list(batches)
        k = order.index(failed[0])
        for tp in order[k:]:
            first = failed[1] if tp == failed[0] else 0
            offset = batches[tp][first].offset
            try:
                self._consumer.seek(tp, offset)
            except KafkaError as exc:  # revoked meanwhile: its next owner reads from the committed offset
                log.warning("cannot rewind %s to %d (%s)", tp, offset, exc)
            with self._lock:
                self._tracker.truncate(tp, offset)  # they are tracked again when consumed again

    def _apply_pause(self, *, force: bool = False) -> None:
        want = self._want_paused or force
        if want != self._paused:
            assigned = list(self._consumer.assignment())
            if want:
                self._consumer.pause(*assigned)
            else:
                self._consumer.resume(*assigned)
            self._paused = want
            log.debug("%s fetching from %s", "paused" if want else "resumed", sorted(assigned))

    def _live_partitions(self) -> set[TopicPartition]:
        """Source partitions fetched now and caught up with the high watermark of the last fetch response.

        (``consumer.highwater``, not ``end_offsets``: see deploy/local/README.md.)
        """
        if self._paused:
            return set()
        live = set()
        for tp in self._consumer.assignment():
            if tp.topic != self._config.sources_topic:
                continue
            highwater = self._consumer.highwater(tp)
            if highwater is None:
                continue  # not fetched yet
            try:
                position = self._consumer.position(tp)
            except KafkaError:  # revoked meanwhile
                continue
            if position is not None and position >= highwater:
                live.add(tp)
        return live

    def _handle(self, record: RecordLike, report: PollReport) -> None:
        origin = Origin.of(record)
        tp = TopicPartition(record.topic, record.partition)
        epoch = getattr(record, "leader_epoch", -1)
        epoch = -1 if epoch is None else epoch
        try:
            if record.topic == self._config.control_topic:
                self._handle_control(record, tp, origin, epoch, report)
            else:
                self._handle_source(record, tp, origin, epoch, report)
        except WireError as exc:
            self._dead_letter(record, tp, origin, epoch, exc, report)

    def _decode(self, decoder: Callable[[RecordLike], Any], record: RecordLike) -> Any:
        """Run a decoder; any exception but a WireError (a decoder bug, RecursionError, MemoryError, ...) is this
        record's fault too: ``decode-failed``, logged with its traceback."""
        try:
            return decoder(record)
        except WireError:
            raise
        except Exception as exc:
            log.exception("decoding %s raised %s", Origin.of(record), type(exc).__name__)
            raise WireError("decode-failed", f"the decoder raised {type(exc).__name__}: {exc}"[:500]) from exc

    def _decode_source_default(self, record: RecordLike) -> Chunk | Seal:
        return decode_source_message(
            record,
            max_value_bytes=self._config.max_message_bytes,
            claim_check_root=self._claim_check_root,
            max_ref_bytes=self._max_ref_bytes,
            max_decoded_bytes=self._max_decoded_bytes,
            max_chunks=self._max_chunks_per_source,
        )

    def _handle_control(
        self, record: RecordLike, tp: TopicPartition, origin: Origin, epoch: int, report: PollReport
    ) -> None:
        if record.value is not None and len(record.value) > self._config.max_message_bytes:
            raise WireError("oversized", f"value is {len(record.value)} bytes, limit {self._config.max_message_bytes}")
        command = self._decode(self._decode_control, record)
        with self._lock:
            self._tracker.add(tp, origin.offset, epoch, ("control", origin))
        try:
            self._on_control(command, origin)
        except Exception as exc:
            log.exception("control command %s from %s failed", safe(command), origin)
            error = WireError("control-failed", f"{type(exc).__name__}: {exc}")
            self._send_dead_letter(record, tp, origin, error, report, rewait=True)
            return
        report.controls += 1
        self._accepted(record)

    def _handle_source(
        self, record: RecordLike, tp: TopicPartition, origin: Origin, epoch: int, report: PollReport
    ) -> None:
        message = self._decode(self._decode_source, record)
        source = message.source
        if self._spool.forgotten(source, origin) or self._tombstoned(source, record):
            with self._lock:
                self._tracker.add(tp, origin.offset, epoch, None)
            self._accepted(record)
            return
        if isinstance(message, Chunk):
            new = self._spool.stage_chunk(source, message.seq, message.data, origin)
            outcome = "staged" if new else "duplicate"
        else:
            new = self._spool.seal(source, message, origin)
            outcome = "sealed" if new else "duplicate"
        report.staged += outcome == "staged"
        report.duplicates += outcome == "duplicate"
        with self._lock:
            # Under our lock: a drop that happens after this read releases the entry added below (the spool
            # tells its drop listeners without holding its own lock), one before it leaves nothing to wait for.
            state = self._spool.state(source)
            registered = source in self._registered or state == SpoolState.REGISTERED
            if registered:
                self._registered.add(source)
            done = registered or state is None
            self._tracker.add(tp, origin.offset, epoch, None if done else ("source", source))
        self._accepted(record)
        if outcome == "sealed":
            self._metrics.sources_sealed.inc()
        sealed = not isinstance(message, Chunk) and state == SpoolState.SEALED
        if sealed and self._announce(source):
            report.sealed.append(source)

    def _tombstoned(self, source: str, record: RecordLike) -> bool:
        """The registry's tombstone of ``source`` covers this record: produced at or before the forget (its
        timestamp), or at or below the last forgotten offset of its partition."""
        if self._tombstone is None:
            return False
        tomb = self._tombstone(source)
        if tomb is None:
            return False
        if record.offset <= tomb.through.get(f"{record.topic}:{record.partition}", -1):
            return True
        timestamp = getattr(record, "timestamp", None)
        return isinstance(timestamp, int) and timestamp >= 0 and timestamp <= tomb.forgotten_at * 1000

    def _announce(self, source: str) -> bool:
        with self._lock:
            if source in self._announced:
                return False
            self._announced.add(source)
        log.info("source %s sealed; handing it to training", source)
        try:
            self._on_sealed(source)
        except BaseException:
            with self._lock:
                self._announced.discard(source)
            raise
        return True

    # ------------------------------------------------------------------------------------------- dead letters

    def _dead_letter(
        self,
        record: RecordLike,
        tp: TopicPartition,
        origin: Origin,
        epoch: int,
        error: WireError,
        report: PollReport,
    ) -> None:
        with self._lock:
            self._tracker.add(tp, origin.offset, epoch, ("dlq", origin))
        self._send_dead_letter(record, tp, origin, error, report, rewait=False)

    def _send_dead_letter(
        self,
        record: RecordLike,
        tp: TopicPartition,
        origin: Origin,
        error: WireError,
        report: PollReport,
        *,
        rewait: bool,
    ) -> None:
        log.warning("dead-lettering %s: %s: %s", origin, error.reason, safe(error.detail))
        if rewait:
            with self._lock:
                self._tracker.rewait(tp, origin.offset, ("dlq", origin))
        try:
            message = encode_dlq(record, error, max_record_bytes=self._config.max_message_bytes)
        except Exception:  # never let one record's copy stop ingestion: send what says why and where
            log.exception("encoding the dead-letter copy of %s failed; sending it without key, value, headers", origin)
            message = _bare_dead_letter(record, error)
        report.rejected[error.reason] = report.rejected.get(error.reason, 0) + 1
        self._metrics.dlq_messages.labels(reason=error.reason).inc()
        self._send(origin, message, error.reason)

    def _send(self, origin: Origin, message: WireMessage, reason: str) -> None:
        """Hand a dead-letter copy to the producer; one it cannot take now is kept and sent again later."""
        topic = self._config.dlq_topic
        try:
            try:
                future = self._dlq.send(topic, key=message.key, value=message.value, headers=message.headers)
            except (MessageSizeTooLargeError, TypeError, ValueError) as exc:
                # the copy itself cannot be sent (foreign headers too large, a null header value): keep only
                # the cdm-dlq-* headers, which say why and where the original is
                log.warning("the dead-letter copy of %s cannot be sent (%s); sending it reduced", origin, exc)
                message = _minimal_dead_letter(message)
                future = self._dlq.send(topic, key=message.key, value=message.value, headers=message.headers)
        except KafkaError as exc:
            future = _Failed(exc)
        self._dlq_inflight.append((origin, future, message, reason))

    def _dead_letter_given_up(self, report: PollReport) -> None:
        """Dead-letter what the worker gave up on (sources that never trained, control commands that failed)."""
        with self._lock:
            sources, self._failed_sources = self._failed_sources, []
            controls, self._failed_controls = self._failed_controls, []
        for origin, detail in controls:
            error = WireError("control-failed", detail)
            tp = TopicPartition(origin.topic, origin.partition)
            record = _Copy(origin.topic, origin.partition, origin.offset, b"", None, [])  # a record needs a key
            self._send_dead_letter(record, tp, origin, error, report, rewait=True)
        for i, (source, detail) in enumerate(sources):
            try:
                lineage = self._spool.lineage(source)
            except SpoolError:  # dropped meanwhile (forgotten): nothing is left to dead-letter
                self.mark_source_dropped(source)
                continue
            where = lineage.seal_origin or (lineage.chunks[-1].origin if lineage.chunks else None)
            if lineage.seal is None or where is None:
                self._spool.drop(source)
                continue
            seal = encode_seal(lineage.seal)
            record = _Copy(where.topic, where.partition, where.offset, seal.key, seal.value, seal.headers)
            error = WireError("training-failed", detail)
            log.warning("dead-lettering the seal of %s: training-failed: %s", source, detail[:500])
            message = encode_dlq(record, error, max_record_bytes=self._config.max_message_bytes)
            try:
                self._dlq.send(
                    self._config.dlq_topic, key=message.key, value=message.value, headers=message.headers
                ).get(timeout=self._dlq_timeout_s)
            except Exception as exc:  # retried at the next poll, after the back-off
                with self._lock:
                    self._failed_sources[:0] = sources[i:]
                self._infra_failure("dlq", f"dead-lettering the seal of {source} failed: {exc}", report)
                return
            report.rejected["training-failed"] = report.rejected.get("training-failed", 0) + 1
            self._metrics.dlq_messages.labels(reason="training-failed").inc()
            self._spool.drop(source)  # its records are released (drop listener); redeliveries are ignored

    def _resend_dead_letters(self, report: PollReport) -> None:
        pending, self._dlq_retry = self._dlq_retry, []
        log.info("sending %d dead-letter copies again", len(pending))
        for origin, message, reason in pending:
            self._send(origin, message, reason)
        self._await_dead_letters(report)

    def _await_dead_letters(self, report: PollReport) -> None:
        inflight, self._dlq_inflight = self._dlq_inflight, []
        failed: list[str] = []
        for origin, future, message, reason in inflight:
            try:
                future.get(timeout=self._dlq_timeout_s)
            except Exception as exc:
                # The record stays uncommitted (so does everything after it in its partition); the copy is sent
                # again after a back-off.
                self._dlq_retry.append((origin, message, reason))
                failed.append(f"{origin}: {type(exc).__name__}: {exc}")
                continue
            with self._lock:
                self._tracker.release(("dlq", origin))
        if failed:
            self._infra_failure(
                "dlq",
                f"the dead-letter topic {self._config.dlq_topic} did not acknowledge {len(failed)} copies "
                f"(first: {failed[0]})",
                report,
            )

    # ------------------------------------------------------------------------------------------- offsets

    def _commit(self, report: PollReport | None = None) -> dict[TopicPartition, int]:
        """Commit what became committable, waiting at most ``broker_check_s`` (the poll loop must not hang on a
        broker that is away); a commit the broker did not answer is a broker failure of ``report``'s poll."""
        with self._lock:
            offsets = self._tracker.committable()
        if not offsets:
            return {}
        try:
            self._consumer.commit(offsets, timeout_ms=max(1, int(self._broker_check_s * 1000)))
        except BROKER_AWAY as exc:
            log.warning("offset commit %s: the broker did not answer (%s); retrying later", _fmt(offsets), exc)
            if report is not None:
                self._infra_failure(
                    "broker",
                    f"the broker did not answer an offset commit within {self._broker_check_s:g}s: {exc!r}",
                    report,
                )
            return {}
        except KafkaError as exc:  # e.g. a rebalance started; kept ready and retried at the next poll
            log.warning("offset commit %s failed (%s); retrying at the next poll", _fmt(offsets), exc)
            return {}
        with self._lock:
            self._tracker.committed(offsets)
        log.debug("committed %s", _fmt(offsets))
        return {tp: om.offset for tp, om in offsets.items()}

    def _report_lag(self) -> None:
        now = self._clock()
        if now < self._next_lag:
            return
        self._next_lag = now + self._lag_interval_s
        # The high watermark from the last fetch response: no extra request, and unlike ListOffsets(LATEST)
        # (end_offsets) it is right on every broker we run against (see deploy/local/README.md).
        lag = 0
        for tp in sorted(self._consumer.assignment()):
            highwater = self._consumer.highwater(tp)
            try:
                position = self._consumer.position(tp) if highwater is not None else None
            except KafkaError:  # revoked meanwhile
                continue
            if highwater is not None and position is not None:
                lag += max(0, highwater - position)
        self._metrics.consumer_lag.set(lag)

    def _accepted(self, record: RecordLike) -> None:
        self._metrics.messages_ingested.inc()
        self._metrics.bytes_ingested.inc(len(record.value or b""))

    def uncommitted(self) -> int:
        """Records consumed whose offsets wait (for a registration, a command or the dead-letter topic)."""
        with self._lock:
            return self._tracker.pending()


@dataclass(frozen=True)
class _Copy:
    """A record rebuilt from what the daemon kept (for dead-lettering after the original was handled)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]


class _Failed:
    """A send the producer refused at once, as a future that raises."""

    def __init__(self, exc: Exception) -> None:
        self._exc = exc

    def get(self, timeout: float | None = None) -> None:
        raise self._exc


def _bare_dead_letter(record: RecordLike, error: WireError) -> WireMessage:
    """A dead-letter copy built without the record's key, value and headers (when encode_dlq itself failed)."""
    headers = [
        (H_DLQ_REASON, error.reason.encode()),
        (H_DLQ_DETAIL, error.detail[:1000].encode("utf-8", "replace")),
        (H_DLQ_TOPIC, record.topic.encode()),
        (H_DLQ_PARTITION, str(record.partition).encode()),
        (H_DLQ_OFFSET, str(record.offset).encode()),
        (H_DLQ_VALUE_OMITTED, str(len(record.value or b"")).encode()),
    ]
    return WireMessage(key=b"", value=None, headers=headers)  # a record needs a key or a value


def _minimal_dead_letter(message: WireMessage) -> WireMessage:
    """The dead-letter copy reduced to its cdm-dlq-* headers (no value, no foreign headers, a short key)."""
    headers = [(k, v) for k, v in message.headers if k.startswith("cdm-dlq-") and isinstance(v, bytes)]
    if message.value is not None and not any(k == H_DLQ_VALUE_OMITTED for k, _ in headers):
        headers.append((H_DLQ_VALUE_OMITTED, str(len(message.value)).encode()))
    key = b"" if message.key is None else message.key[:256]  # a record needs a key or a value
    return WireMessage(key=key, value=None, headers=headers)
