"""The training worker: one thread that turns sealed sources and control commands into registry changes.

Jobs run one at a time, off the Kafka poll thread. Each job is crash-safe:

* train: lock the source -> assemble its spooled data -> ``begin_training`` (idempotent per fingerprint, so a
  redelivered source is never trained twice) -> train, resuming from ``work/<source>-<fp>`` -> save the
  compartment (safetensors + manifest) -> ``activate`` (one atomic epoch bump) -> tell the poll thread, which
  only then commits the source's offsets.
* retrain-router: over the kept data of the active compartments; registered with ``set_router``.
* forget-source / forget-samples: exact forgetting (every derived artifact deleted, router retrained) with a
  receipt in the audit log.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from cdm.artifacts import artifact_path, artifact_uri, remove_tree
from cdm.config import LibraryConfig
from cdm.data import SourceData, fingerprint, load_npz, save_npz
from cdm.errors import CdmError
from cdm.routing import save_router, train_router
from cdm.training import train_compartment
from daemon.metrics import Metrics
from daemon.spool import Spool
from daemon.wire import Origin
from registry.coordination import Coordinator
from registry.records import CompartmentRecord, CompartmentStatus, RouterRecord
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
    not_before: float = 0.0  # monotonic time before which the job is not retried
    release_lock: str = ""  # a job lock (daemon.jobs) to release when the job ends


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
    router_dirty_since: float | None = None  # monotonic time of the first unrouted change


@dataclass(frozen=True)
class Notices:
    """Callbacks into the poll thread (the Kafka consumer is not thread-safe: they must only enqueue)."""

    source_registered: Callable[[str], None]
    source_dropped: Callable[[str], None]
    control_done: Callable[[Origin], None]


@dataclass(frozen=True)
class ArtifactLayout:
    """Where the daemon keeps its files (shared by all replicas of a consumer group)."""

    root: Path

    def compartment(self, cid: str) -> Path:
        return self.root / "compartments" / cid

    def router(self, router_id: str) -> Path:
        return self.root / "routers" / router_id

    def data(self, source: str) -> Path:
        return self.root / "data" / f"{source}.npz"

    def work(self, source: str, fp: str) -> Path:
        return self.root / "work" / f"{source}-{fp[:16]}"

    def work_dirs(self, source: str) -> list[Path]:
        return sorted((self.root / "work").glob(f"{source}-*"))

    def routers(self) -> list[Path]:
        d = self.root / "routers"
        return sorted(p for p in d.iterdir() if p.is_dir()) if d.exists() else []


class TrainingWorker:
    """Runs jobs in one background thread.

    Args:
        registry: the Redis registry (writes).
        coordinator: source and job locks.
        spool: staged source chunks.
        layout: artifact directories.
        library: model/train/router config.
        daemon_id: this replica's id (lock owner).
        lock_ttl_s: per-source lock lease; refreshed while training.
        notices: callbacks that hand results to the poll thread.
        metrics: the daemon's metrics (training loss and seconds, router accuracy, forgetting seconds), if any.
        progress: show training progress bars on stderr.
    """

    def __init__(
        self,
        *,
        registry: Registry,
        coordinator: Coordinator,
        spool: Spool,
        layout: ArtifactLayout,
        library: LibraryConfig,
        daemon_id: str,
        lock_ttl_s: float,
        notices: Notices,
        metrics: Metrics | None = None,
        progress: bool = False,
    ) -> None:
        self.registry = registry
        self.coordinator = coordinator
        self.spool = spool
        self.layout = layout
        self.lib = library
        self.daemon_id = daemon_id
        self.lock_ttl_s = lock_ttl_s
        self.notices = notices
        self.metrics = metrics
        self.progress = progress
        self.status = WorkerStatus()
        self._jobs: queue.Queue[Job] = queue.Queue()
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
        self._jobs.put(job)

    def pending(self) -> int:
        return self._jobs.qsize()

    def idle(self) -> bool:
        return self._jobs.empty() and self.status.job == "idle"

    def mark_router_dirty(self) -> None:
        if self.status.router_dirty_since is None:
            self.status.router_dirty_since = time.monotonic()

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                job = self._jobs.get(timeout=0.2)
            except queue.Empty:
                continue
            if job.not_before > time.monotonic():
                self._jobs.put(job)
                self._stopping.wait(0.2)
                continue
            self.status.job, self.status.source = job.kind, job.source
            try:
                with self.metrics.job(job.kind) if self.metrics is not None else contextlib.nullcontext():
                    self.run_job(job)
                self.status.jobs_done += 1
            except Exception as exc:  # one bad job must not kill the worker; the record stays uncommitted
                self.status.last_error = f"{job.kind} {job.source}: {type(exc).__name__}: {exc}"
                log.exception("job %s %s failed", job.kind, job.source)
            finally:
                self.status.job, self.status.source, self.status.step = "idle", "", 0

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

    # -- training ---------------------------------------------------------------------------------
    def _on_step(self, source: str, steps: int) -> Callable[[int, float], None]:
        def on_step(step: int, loss: float) -> None:
            self.status.step, self.status.steps, self.status.loss = step, steps, loss
            if self.metrics is not None:
                self.metrics.progress.step(self.status.job, source, step, steps, loss)
            now = time.monotonic()
            if now - self._last_refresh > self.lock_ttl_s / 3:
                self._last_refresh = now
                if not self.coordinator.refresh_source_lock(source, self.daemon_id, self.lock_ttl_s):
                    log.warning("lost the training lock of %s; another replica may take over", source)

        return on_step

    def train_source(self, job: Job) -> CompartmentRecord | None:
        """Train the compartment of a sealed source and register it (idempotent; resumable)."""
        source = job.source
        if not self.coordinator.acquire_source_lock(source, self.daemon_id, self.lock_ttl_s):
            log.info("%s is being trained by another replica; retrying later", source)
            self.submit(dataclasses.replace(job, not_before=time.monotonic() + self.lock_ttl_s / 4))
            return None
        try:
            data = self.spool.assemble(source)
            return self._train_and_register(source, data, lineage=self._lineage(source))
        finally:
            self.coordinator.release_source_lock(source, self.daemon_id)

    def _lineage(self, source: str) -> dict[str, Any]:
        lin = self.spool.lineage(source)
        return json_safe(dataclasses.asdict(lin)) if dataclasses.is_dataclass(lin) else {"source": source}

    def _train_and_register(
        self, source: str, data: SourceData, *, lineage: dict[str, Any]
    ) -> CompartmentRecord | None:
        fp = fingerprint(data)
        record = self.registry.begin_training(source, fp, lineage)
        if record.status is CompartmentStatus.ACTIVE:
            log.info("%s (fingerprint %s) is already registered as %s", source, fp[:12], record.compartment_id)
            self._registered(source, record)
            return record
        cid = record.compartment_id
        workdir = self.layout.work(source, fp)
        # keep the data: the router is retrained from it, forgetting deletes it
        save_npz(self.layout.data(source), data)
        train = self.lib.train
        log.info("training %s on %d samples (%d steps)", cid, len(data), train.steps)
        result = train_compartment(
            cid,
            data,
            model=self.lib.model,
            train=train,
            num_classes=self.lib.model.num_classes,
            workdir=workdir,
            progress=self.progress,
            should_stop=self._stopping.is_set,
            on_step=self._on_step(source, train.steps),
        )
        if result.compartment is None:
            log.info("training of %s interrupted at step %d; it resumes on restart", cid, result.steps)
            return None
        manifest = result.compartment.save(self.layout.compartment(cid))
        snap = self.registry.snapshot()
        total = len(data) + sum(c.n_samples for c in snap.compartments if c.source != source)
        active = self.registry.activate(
            cid,
            artifact_uri=artifact_uri(self.layout.compartment(cid)),
            sha256=manifest.sha256,
            prior=len(data) / max(1, total),
            class_counts=manifest.class_counts,
            n_samples=len(data),
            train_metrics={
                "final_loss": result.final_loss,
                "steps": result.steps,
                "seconds": result.seconds,
                "resumed_from": result.resumed_from,
                "daemon_id": self.daemon_id,
            },
        )
        remove_tree(workdir)
        if self.metrics is not None:
            self.metrics.training_seconds.observe(result.seconds)
            self.metrics.compartments_trained.inc()
        self._registered(source, active)
        self.mark_router_dirty()
        return active

    def _registered(self, source: str, record: CompartmentRecord) -> None:
        self.spool.mark_registered(source, record.compartment_id)
        self.notices.source_registered(source)

    # -- router -----------------------------------------------------------------------------------
    def retrain_router(self) -> RouterRecord | None:
        """Retrain the router over the active compartments' kept data and register it."""
        self.status.router_dirty_since = None
        snap = self.registry.snapshot()
        if not snap.compartments:
            return None
        datasets = {c.compartment_id: load_npz(self.layout.data(c.source)) for c in snap.compartments}
        result = train_router(
            datasets,
            model=self.lib.model,
            router=self.lib.router,
            num_classes=self.lib.model.num_classes,
            progress=self.progress,
        )
        router_id = f"r{snap.epoch}-{uuid.uuid4().hex[:8]}"
        directory = self.layout.router(router_id)
        manifest = save_router(result.router, result.manifest, directory)
        record = RouterRecord(
            router_id=router_id,
            artifact_uri=artifact_uri(directory),
            sha256=manifest.sha256,
            compartment_ids=snap.compartment_ids,
            trained_at_epoch=snap.epoch,
            metrics={
                "accuracy": result.report.accuracy,
                "ece": result.report.ece,
                "accuracy_by_noise": result.report.accuracy_by_noise,
                "seconds": result.report.train_seconds,
            },
        )
        self.registry.set_router(record)
        if self.metrics is not None:
            self.metrics.router_accuracy.set(result.report.accuracy)
        if self.registry.snapshot().compartment_ids != snap.compartment_ids:
            self.mark_router_dirty()  # the composition moved on while we trained
        return record

    def _delete_old_routers(self, keep: RouterRecord | None) -> list[str]:
        keep_dir = artifact_path(keep.artifact_uri).resolve() if keep else None
        deleted: list[str] = []
        for d in self.layout.routers():
            if keep_dir is None or d.resolve() != keep_dir:
                deleted += remove_tree(d)
        return deleted

    # -- forgetting ---------------------------------------------------------------------------------
    def forget_source(self, job: Job) -> dict[str, Any]:
        """Exact forgetting of a source: retire, delete every derived artifact, retrain the router."""
        started = time.perf_counter()
        source = job.source
        before = self.registry.snapshot()
        router_before = before.router.router_id if before.router else None
        receipt = self.registry.forget_source(source, reason=job.request_id or "forget-source")
        deleted: list[str] = []
        for rec in self.registry.history(source):
            deleted += remove_tree(self.layout.compartment(rec.compartment_id))
        for d in self.layout.work_dirs(source):
            deleted += remove_tree(d)
        deleted += remove_tree(self.layout.data(source))
        drop = self.spool.drop(source)
        self.notices.source_dropped(source)
        # the router saw the forgotten data: retrain without it and delete every older router
        after = self.retrain_router()
        if after is None:
            self.registry.clear_router()
        deleted += self._delete_old_routers(after)
        untouched = {
            c.compartment_id: c.sha256.get("unet/diffusion_pytorch_model.safetensors", "")
            for c in self.registry.snapshot().compartments
        }
        seconds = time.perf_counter() - started
        doc = {
            "kind": "forget-source",
            "source": source,
            "request_id": job.request_id,
            "registry_receipt": receipt.receipt_id,
            "retired": list(receipt.compartment_ids),
            "deleted_files": deleted,
            "spool": json_safe(dataclasses.asdict(drop)),
            "router_before": router_before,
            "router_after": after.router_id if after else None,
            "untouched": untouched,
            "seconds": seconds,
        }
        self.registry.record_audit("forget-complete", doc)
        if self.metrics is not None:
            self.metrics.forgetting_seconds.observe(seconds)
        if job.origin is not None:
            self.notices.control_done(job.origin)
        log.info("forgot %s: %d files deleted in %.1fs", source, len(deleted), seconds)
        return doc

    def forget_samples(self, job: Job) -> dict[str, Any]:
        """Exact forgetting of samples: retrain only this source's compartment without them, then the router."""
        started = time.perf_counter()
        source = job.source
        snap = self.registry.snapshot()
        current = snap.by_source().get(source)
        if current is None:
            raise CdmError(f"forget-samples: source {source!r} has no active compartment")
        data = load_npz(self.layout.data(source))
        drop = np.isin(data.ids, np.asarray(job.sample_ids, dtype=np.int64))
        if drop.all():
            return self.forget_source(job)
        kept = data.subset(~drop)
        old_files = remove_tree(self.layout.data(source))
        lineage = dict(current.lineage, forget_samples={"request_id": job.request_id, "removed": int(drop.sum())})
        new = self._train_and_register(source, kept, lineage=lineage)
        deleted = old_files
        if new is not None:
            deleted += remove_tree(self.layout.compartment(current.compartment_id))
        after = self.retrain_router()
        deleted += self._delete_old_routers(after)
        seconds = time.perf_counter() - started
        doc = {
            "kind": "forget-samples",
            "source": source,
            "request_id": job.request_id,
            "removed": int(drop.sum()),
            "unknown_ids": sorted(set(job.sample_ids) - set(data.ids[drop].tolist())),
            "old_compartment": current.compartment_id,
            "new_compartment": new.compartment_id if new else None,
            "deleted_files": deleted,
            "router_after": after.router_id if after else None,
            "seconds": seconds,
        }
        self.registry.record_audit("forget-complete", doc)
        if self.metrics is not None:
            self.metrics.forgetting_seconds.observe(seconds)
        if job.origin is not None:
            self.notices.control_done(job.origin)
        return doc

    # -- garbage collection ---------------------------------------------------------------------------
    def collect_garbage(self, grace_s: float, now: float | None = None) -> list[str]:
        """Delete artifacts of compartments retired more than ``grace_s`` ago and of unused routers."""
        now = time.time() if now is None else now
        deleted: list[str] = []
        for source in self.registry.sources():
            for rec in self.registry.history(source):
                if rec.status is CompartmentStatus.RETIRED and now - rec.updated_at > grace_s:
                    deleted += remove_tree(self.layout.compartment(rec.compartment_id))
        snap = self.registry.snapshot()
        keep = artifact_path(snap.router.artifact_uri).resolve() if snap.router else None
        for d in self.layout.routers():
            if d.resolve() != keep and now - d.stat().st_mtime > grace_s:
                deleted += remove_tree(d)
        return deleted


def json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float | int | str | bool) or obj is None:
        return obj
    return str(obj)
