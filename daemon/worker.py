"""The training worker: one thread that turns sealed sources and control commands into registry changes.

Jobs run one at a time, off the Kafka poll thread, through the ONE lifecycle of ``cdm.lifecycle`` (the offline
store runs the same) over the registry (``daemon.catalogue``) and the artifact store (``[artifacts]``):

* train: lock the source -> its tombstone checked (staged data from before a forget is dropped, never trained)
  -> the train plan (idempotent per data fingerprint, resumable, artifacts uploaded, activated) -> tell the poll
  thread, which only then commits the source's offsets.
* retrain-router: the learnt router over the kept data of the active compartments (nothing with ``[router] kind
  = "density"``).
* forget-source / forget-samples: the journaled forget plans; the request's one receipt is written when it is
  complete, and only then is the control record acknowledged. A redelivered request re-acknowledges.

A job that fails is retried with bounded exponential back-off (``[daemon] job_retry_initial_s`` doubling up to
``job_retry_max_s``). A source that failed ``job_max_attempts`` times is dropped: the poll thread dead-letters
its seal as ``training-failed`` and releases its offsets. Forget requests are retried until they complete
(forgetting cannot be given up); a control ``retrain-router`` is dead-lettered as ``control-failed``. A failure
because the registry's Redis could not be reached (:func:`is_outage`) is no fault of the job: it is retried with
the same back-off until Redis is back, and never counts towards ``job_max_attempts`` (an outage longer than the
retries must not drop a good source).
"""

from __future__ import annotations

import contextlib
import dataclasses
import heapq
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import redis

from cdm.artifacts import ArtifactStore
from cdm.config import LibraryConfig
from cdm.errors import CdmError, SourceForgotten, TrainingInterrupted
from cdm.lifecycle import (
    Lifecycle,
    RouterKind,
    Tombstone,
    compartment_prefix,
    data_key,
    router_created_at,
    router_prefix,
)
from common.jsonable import json_safe
from daemon.catalogue import RegistryCatalogue
from daemon.metrics import Metrics
from daemon.spool import SourceLineage, Spool, SpoolError, SpoolState
from daemon.wire import Origin
from registry.coordination import Coordinator
from registry.records import CompartmentRecord, CompartmentStatus
from registry.writer import Registry

log = logging.getLogger(__name__)

JobKind = Literal["train", "retrain-router", "forget-source", "forget-samples"]


@dataclass(frozen=True)
class Job:
    kind: JobKind
    source: str = ""
    sample_ids: tuple[int, ...] = ()
    origin: Origin | None = None  # the control record that asked for it (committed when done)
    request_id: str = ""
    not_before: float = 0.0  # monotonic time before which the job is not run (retries, lock waits)
    release_lock: str = ""  # a job lock (daemon.jobs) to release when the job ends
    attempt: int = 0  # failed runs so far that count towards RetryPolicy.max_attempts
    outages: int = 0  # failed runs so far because Redis was unreachable (retried without limit)

    @property
    def forget_request_id(self) -> str:
        """The request id a forget is journaled under: the command's, else its record's position (stable across
        redeliveries)."""
        if self.request_id:
            return self.request_id
        if self.origin is not None:
            return f"{self.origin.topic}:{self.origin.partition}:{self.origin.offset}"
        raise CdmError(f"{self.kind} of {self.source!r} has neither a request id nor an origin")


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded exponential back-off of failed jobs."""

    max_attempts: int = 5  # a source failing this many times is dropped (dead-lettered as training-failed)
    initial_s: float = 5.0  # wait before the first retry
    max_s: float = 300.0  # the wait doubles per failure up to this

    def delay(self, attempt: int) -> float:
        """Seconds to wait before run number ``attempt + 1`` (``attempt`` >= 1 failures so far)."""
        return min(self.max_s, self.initial_s * 2 ** min(attempt - 1, 30))


@dataclass
class WorkerStatus:
    """What the worker is doing (for /readyz, heartbeats and the status page)."""

    job: str = "idle"
    source: str = ""
    step: int = 0
    steps: int = 0
    loss: float = float("nan")
    jobs_done: int = 0
    last_error: str = ""
    retrying: int = 0  # jobs waiting for a retry
    router_dirty_since: float | None = None  # monotonic time of the first unrouted change
    first_step: int = 0  # the first step this job reported (a resumed training starts past 0) ...
    first_step_at: float | None = None  # ... and its monotonic time: the step rate, hence the ETA, starts there

    def eta_s(self, now: float) -> float | None:
        """Seconds left in the job in progress at the rate since its first step (``now``: monotonic); None when
        no rate is known yet."""
        done = self.step - self.first_step
        if self.first_step_at is None or done <= 0 or self.steps <= 0:
            return None
        return max(0.0, (self.steps - self.step) * (now - self.first_step_at) / done)


@dataclass(frozen=True)
class Notices:
    """Callbacks into the poll thread (the Kafka consumer is not thread-safe: they must only enqueue)."""

    source_registered: Callable[[str], None]
    source_dropped: Callable[[str], None]
    control_done: Callable[[Origin], None]
    training_failed: Callable[[str, str], None]  # (source, why): dead-letter its seal, release its offsets
    control_failed: Callable[[Origin, str], None]  # (control record, why): dead-letter it as control-failed


def is_outage(exc: BaseException) -> bool:
    """The job failed because the registry's Redis could not be reached (refused, timed out, still loading its
    data after a restart), not because of the job: it will succeed once Redis is back."""
    return isinstance(exc, redis.ConnectionError | redis.TimeoutError)


def predates(lineage: SourceLineage, tomb: Tombstone) -> bool:
    """True when staged data of a source (``lineage``) arrived before the source was forgotten (``tomb``):
    a chunk staged at or before the forget, or a record at or below the tombstone's offset of its partition."""
    origins = [c.origin for c in lineage.chunks] + ([lineage.seal_origin] if lineage.seal_origin else [])
    if any(c.staged_at <= tomb.forgotten_at for c in lineage.chunks):
        return True
    return any(o.offset <= tomb.through.get(f"{o.topic}:{o.partition}", -1) for o in origins)


class TrainingWorker:
    """Runs jobs in one background thread.

    Args:
        registry: the Redis registry (writes).
        coordinator: source and job locks.
        spool: staged source chunks.
        store: the artifact store (``cdm.artifacts.open_store([artifacts])``).
        work_root: local scratch: resumable checkpoints (``work/``) and artifacts before upload (``out/``).
        library: model/train/router config (``[router] kind`` selects the router, default "learnt").
        daemon_id: this replica's id (lock owner).
        lock_ttl_s: per-source lock lease; refreshed while training.
        notices: callbacks that hand results to the poll thread.
        metrics: the daemon's metrics (training loss and seconds, router accuracy, forgetting seconds), if any.
        progress: show training progress bars on stderr.
        retry: back-off and attempts of failed jobs.
        after_step: called after each completed forget step (tests inject crashes there).
    """

    def __init__(
        self,
        *,
        registry: Registry,
        coordinator: Coordinator,
        spool: Spool,
        store: ArtifactStore,
        work_root: Path,
        library: LibraryConfig,
        daemon_id: str,
        lock_ttl_s: float,
        notices: Notices,
        metrics: Metrics | None = None,
        progress: bool = False,
        retry: RetryPolicy | None = None,
        after_step: Callable[[str], None] | None = None,
    ) -> None:
        self.registry = registry
        self.coordinator = coordinator
        self.spool = spool
        self.store = store
        self.work_root = Path(work_root)
        self.lib = library
        self.daemon_id = daemon_id
        self.lock_ttl_s = lock_ttl_s
        self.notices = notices
        self.metrics = metrics
        self.progress = progress
        self.retry = retry or RetryPolicy()
        self.after_step = after_step
        self.router_kind: RouterKind = getattr(library.router, "kind", "learnt")
        self.catalogue = RegistryCatalogue(registry, local_lineage=self._spool_lineage)
        self.status = WorkerStatus()
        self._jobs: queue.Queue[Job] = queue.Queue()
        self._delayed: list[tuple[float, int, Job]] = []  # (not_before, seq, job) heap
        self._delayed_lock = threading.Lock()
        self._seq = itertools.count()
        self._stopping = threading.Event()  # warm shutdown: checkpoint and leave at the next step
        self._thread: threading.Thread | None = None
        self._last_refresh = 0.0

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="cdm-training", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Warm stop: the current training checkpoints at its next step; queued jobs stay unacknowledged."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, job: Job) -> None:
        """Queue ``job``; one with a future ``not_before`` waits aside (it does not count as pending work)."""
        if job.not_before > time.monotonic():
            with self._delayed_lock:
                heapq.heappush(self._delayed, (job.not_before, next(self._seq), job))
                self.status.retrying = len(self._delayed)
        else:
            self._jobs.put(job)

    def pending(self) -> int:
        return self._jobs.qsize()

    def waiting(self) -> int:
        """Jobs waiting for a retry or a lock."""
        with self._delayed_lock:
            return len(self._delayed)

    def idle(self) -> bool:
        return self._jobs.empty() and self.status.job == "idle"

    def mark_router_dirty(self) -> None:
        if self.status.router_dirty_since is None:
            self.status.router_dirty_since = time.monotonic()

    def next_job(self, timeout: float = 0.2) -> Job | None:
        """The next job to run: due retries first join the queue; None when nothing is due within ``timeout``."""
        now = time.monotonic()
        with self._delayed_lock:
            while self._delayed and self._delayed[0][0] <= now:
                self._jobs.put(heapq.heappop(self._delayed)[2])
            self.status.retrying = len(self._delayed)
        try:
            return self._jobs.get(timeout=timeout)
        except queue.Empty:
            return None

    def _run(self) -> None:
        while not self._stopping.is_set():
            job = self.next_job()
            if job is not None:
                self.run_one(job)

    def run_one(self, job: Job) -> bool:
        """Run ``job``; a failure is logged and retried later (see ``_failed``). True if it completed."""
        self.status.job, self.status.source = job.kind, job.source
        try:
            with self.metrics.job(job.kind) if self.metrics is not None else contextlib.nullcontext():
                self.run_job(job)
            self.status.jobs_done += 1
            return True
        except TrainingInterrupted as exc:  # a stop request: the job reruns after the restart (uncommitted)
            log.info("%s %s interrupted: %s", job.kind, job.source, exc)
        except Exception as exc:  # one bad job must not kill the worker; it is retried (see _failed)
            self.status.last_error = f"{job.kind} {job.source}: {type(exc).__name__}: {exc}"
            if is_outage(exc):  # no traceback: it says nothing about the job
                log.warning("job %s %s failed: Redis is unreachable (%s)", job.kind, job.source, exc)
            else:
                log.exception("job %s %s failed (attempt %d)", job.kind, job.source, job.attempt + 1)
            self._failed(job, exc)
        finally:
            self.status.job, self.status.source, self.status.step = "idle", "", 0
            self.status.first_step, self.status.first_step_at = 0, None
        return False

    def _failed(self, job: Job, exc: Exception) -> None:
        """Retry with back-off; give a source up after ``retry.max_attempts`` failures of its own (its seal is
        dead-lettered); a Redis outage is waited out, however long it lasts."""
        why = f"{type(exc).__name__}: {exc}"[:900]
        if job.kind == "retrain-router" and job.origin is None:
            return  # the periodic router check submits it again
        if is_outage(exc):
            outages = job.outages + 1
            delay = self.retry.delay(job.attempt + outages)
            log.warning(
                "%s %s: Redis unreachable, retry in %.1fs (outage failure %d)", job.kind, job.source, delay, outages
            )
            self.submit(dataclasses.replace(job, outages=outages, not_before=time.monotonic() + delay))
            return
        attempt = job.attempt + 1
        if job.kind in ("train", "retrain-router") and attempt >= self.retry.max_attempts:
            detail = f"{job.kind} failed {attempt} times; last error: {why}"
            if job.kind == "train":
                log.error("giving up on %s: %s", job.source, detail)
                self.notices.training_failed(job.source, detail)
            elif job.origin is not None:
                self.notices.control_failed(job.origin, detail)
            return
        delay = self.retry.delay(attempt + job.outages)
        log.warning("%s %s: retry %d in %.1fs", job.kind, job.source, attempt, delay)
        self.submit(dataclasses.replace(job, attempt=attempt, not_before=time.monotonic() + delay))

    def run_job(self, job: Job) -> None:
        if job.kind == "train":
            self.train_source(job)
        elif job.kind == "retrain-router":
            try:
                self.retrain_router()
            finally:
                if job.release_lock:
                    self.coordinator.release_job_lock(job.release_lock, self.daemon_id)
            if job.origin is not None:
                self.notices.control_done(job.origin)
        elif job.kind == "forget-source":
            self.forget_source(job)
        elif job.kind == "forget-samples":
            self.forget_samples(job)
        else:  # pragma: no cover - Literal exhausts the kinds
            raise CdmError(f"unknown job kind {job.kind!r}")

    def lifecycle(self, *, local_cleanup: Callable[[str], list[str]] | None = None) -> Lifecycle:
        """The shared lifecycle over the registry and the artifact store."""
        return Lifecycle(
            self.catalogue,
            self.store,
            model=self.lib.model,
            train=self.lib.train,
            router=self.lib.router,
            work_root=self.work_root,
            router_kind=self.router_kind,
            trainer_id=self.daemon_id,
            progress=self.progress,
            should_stop=self._stopping.is_set,
            on_step=self._on_step,
            after_step=self.after_step,
            local_cleanup=local_cleanup,
        )

    # -- training ---------------------------------------------------------------------------------
    def _on_step(self, source: str, step: int, steps: int, loss: float) -> None:
        self.status.step, self.status.steps, self.status.loss = step, steps, loss
        if self.status.first_step_at is None:
            self.status.first_step, self.status.first_step_at = step, time.monotonic()
        if self.metrics is not None:
            self.metrics.progress.step(self.status.job, source, step, steps, loss)
        now = time.monotonic()
        if now - self._last_refresh > self.lock_ttl_s / 3:
            self._last_refresh = now
            if not self.coordinator.refresh_source_lock(source, self.daemon_id, self.lock_ttl_s):
                log.warning("lost the training lock of %s; another replica may take over", source)

    def _spool_lineage(self, source: str) -> dict[str, Any] | None:
        try:
            return json_safe(dataclasses.asdict(self.spool.lineage(source)))
        except SpoolError:
            return None

    def train_source(self, job: Job) -> CompartmentRecord | None:
        """Train the compartment of a sealed source and register it (idempotent; resumable)."""
        source = job.source
        if self.spool.state(source) != SpoolState.SEALED:
            log.info("%s is %s; nothing to train", source, self.spool.state(source) or "no longer in the spool")
            return None
        if not self.coordinator.acquire_source_lock(source, self.daemon_id, self.lock_ttl_s):
            log.info("%s is being trained by another replica; retrying later", source)
            self.submit(dataclasses.replace(job, not_before=time.monotonic() + self.lock_ttl_s / 4))
            return None
        try:
            lineage = self.spool.lineage(source)
            stale = _stale_check(lineage)
            tomb = self.catalogue.tombstone(source)
            if tomb is not None and stale(tomb):
                if lineage.seal is not None:  # an earlier attempt may have left checkpoints of the forgotten data
                    self.lifecycle().discard(source, lineage.seal.fingerprint)
                raise SourceForgotten(f"{source} was forgotten by request {tomb.request_id!r} after it was staged")
            data = self.spool.assemble(source)
            lineage_doc = json_safe(dataclasses.asdict(lineage))
            outcome = self.lifecycle().train(source, data, lineage=lineage_doc, is_stale=stale)
        except SourceForgotten as exc:
            log.info("dropping %s instead of training it: %s", source, exc)
            self.spool.drop(source)
            self.notices.source_dropped(source)
            return None
        finally:
            self.coordinator.release_source_lock(source, self.daemon_id)
        record = self.registry.get(outcome.entry.compartment_id)
        if outcome.result is not None and self.metrics is not None:
            self.metrics.training_seconds.observe(outcome.result.seconds)
            self.metrics.compartments_trained.inc()
        self._registered(source, record)
        if outcome.trained:
            self.mark_router_dirty()
        return record

    def _registered(self, source: str, record: CompartmentRecord) -> None:
        self.spool.mark_registered(source, record.compartment_id)
        self.notices.source_registered(source)

    # -- router -----------------------------------------------------------------------------------
    def retrain_router(self) -> str | None:
        """Retrain the learnt router over the active compartments' kept data; returns its id (None: no router)."""
        self.status.router_dirty_since = None
        if self.router_kind != "learnt":
            return None
        before = self.registry.snapshot().compartment_ids
        outcome = self.lifecycle().retrain_router()
        if outcome is not None and self.metrics is not None:
            self.metrics.router_accuracy.set(outcome.result.report.accuracy)
        if self.registry.snapshot().compartment_ids != before:
            self.mark_router_dirty()  # the composition moved on while we trained
        return outcome.entry.router_id if outcome is not None else None

    # -- forgetting ---------------------------------------------------------------------------------
    def _drop_local(self, source: str) -> list[str]:
        """Delete this replica's spool copy of a forgotten source (a spool tombstone stays); the files deleted."""
        return list(self.spool.drop(source).files)

    def forget_source(self, job: Job) -> dict[str, Any]:
        """Exact forgetting of a source (``cdm.lifecycle`` forget-source plan); acknowledged once complete."""
        started = time.time()
        receipt = self.lifecycle(local_cleanup=self._drop_local).forget_source(
            job.source, request_id=job.forget_request_id
        )
        self.notices.source_dropped(job.source)
        return self._forgotten(job, receipt.to_dict(), started)

    def forget_samples(self, job: Job) -> dict[str, Any] | None:
        """Exact forgetting of samples (``cdm.lifecycle`` forget-samples plan); acknowledged once complete.

        The source's training lock is held while its compartment is retrained (None: another replica holds it;
        the job waits and runs again)."""
        started = time.time()
        if not self.coordinator.acquire_source_lock(job.source, self.daemon_id, self.lock_ttl_s):
            log.info("%s is being trained by another replica; forget-samples waits", job.source)
            self.submit(dataclasses.replace(job, not_before=time.monotonic() + self.lock_ttl_s / 4))
            return None
        try:
            receipt = self.lifecycle(local_cleanup=self._drop_local).forget_samples(
                job.source, job.sample_ids, request_id=job.forget_request_id
            )
        finally:
            self.coordinator.release_source_lock(job.source, self.daemon_id)
        if receipt.outcome == "forgotten":  # every sample matched: the whole source went
            self.notices.source_dropped(job.source)
        elif receipt.new_compartment:
            self.mark_router_dirty()
        return self._forgotten(job, receipt.to_dict(), started)

    def _forgotten(self, job: Job, receipt: Mapping[str, Any], started: float) -> dict[str, Any]:
        if receipt["completed_at"] >= started and self.metrics is not None:  # completed now, not re-acknowledged
            self.metrics.forgetting_seconds.observe(receipt["seconds"])
        if job.origin is not None:
            self.notices.control_done(job.origin)
        log.info(
            "%s %s (request %s): %s; %d files deleted",
            job.kind,
            job.source,
            receipt["request_id"],
            receipt["outcome"],
            len(receipt["deleted_files"]),
        )
        return dict(receipt)

    # -- garbage collection ---------------------------------------------------------------------------
    def collect_garbage(self, grace_s: float, now: float | None = None) -> list[str]:
        """Delete artifacts of compartments retired more than ``grace_s`` ago and of unused older routers."""
        now = time.time() if now is None else now
        deleted: list[str] = []
        for source in self.registry.sources():
            history = self.registry.history(source)
            live_fps = {r.fingerprint for r in history if r.status is not CompartmentStatus.RETIRED}
            for rec in history:
                if rec.status is CompartmentStatus.RETIRED and now - rec.updated_at > grace_s:
                    deleted += self.store.delete(compartment_prefix(rec.compartment_id), recursive=True)
                    if rec.fingerprint and rec.fingerprint not in live_fps:
                        deleted += self.store.delete(data_key(source, rec.fingerprint))
        snap = self.registry.snapshot()
        keep = snap.router.router_id if snap.router else None
        for rid in sorted({k.split("/")[1] for k in self.store.list("routers")}):
            created = router_created_at(rid)
            if rid != keep and created is not None and now - created > grace_s:
                deleted += self.store.delete(router_prefix(rid), recursive=True)
        return deleted


def _stale_check(lineage: SourceLineage) -> Callable[[Tombstone], bool]:
    def stale(tomb: Tombstone) -> bool:
        return predates(lineage, tomb)

    return stale
