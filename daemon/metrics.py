"""Every Prometheus metric the daemon exports, registered on the ``CollectorRegistry`` passed in.

Names use the ``cdm_`` prefix and base units (seconds, bytes); counters end in ``_total`` in the exposition.
No label carries user data (source names, sample ids): per-source detail belongs in logs, /status and the registry.
Every label has a fixed set of values, listed here (``JOB_KINDS``, ``STAGES``, ``api.process_metrics.VOLUMES``,
``daemon.wire.REASONS``, the spool states), and labelled counters start at 0 for each value so ``rate()`` and
``increase()`` see the first event. This module is the one source of the daemon's metric names: the rules
(deploy/observability/prometheus) and the dashboards (deploy/observability/grafana) are checked against, or
generated from, ``Metrics(CollectorRegistry())``.
Tests build ``Metrics(CollectorRegistry())`` and read values with ``registry.get_sample_value(name, labels)``.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from api.process_metrics import VolumeCollector, ready_gauge, registry_latest_epoch_gauge
from sampler.metrics import SamplerMetrics

TRAINING_BUCKETS = (1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0)
FORGETTING_BUCKETS = (0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
JOB_BUCKETS = (0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0)
STAGE_BUCKETS = (0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0, 86400.0)

# the `kind` label: daemon.worker.JobKind (repeated: the worker imports this module; a test keeps them equal)
JOB_KINDS = ("train", "retrain-router", "forget-source", "forget-samples")
FORGET_KINDS = ("forget-source", "forget-samples")
# the `stage` label: where a source's path arrived (the histogram observes the time since the previous stage)
STAGES = ("sealed", "training", "registered", "served")
SPOOL_STATES = ("staged", "sealed", "registered")  # daemon.spool.SpoolState (a test keeps them equal)


class Metrics(SamplerMetrics):
    """The daemon's metrics (with those of the composition it serves, ``sampler.metrics.SamplerMetrics``).

    Args:
        registry: where to register (a fresh ``CollectorRegistry()`` per daemon or test; never the global
            default, so two instances in one process do not collide).
        dlq_reasons: dead-letter reasons to export as 0 from the start (e.g. ``daemon.wire.REASONS``), so
            rate() works before the first failure.
        volumes: ``volume`` label -> directory whose file system (and, for "spool" and "cache", own size) is
            exported (``api.process_metrics.VolumeCollector``).
        clock: wall-clock seconds (source stages, ETA); injectable for tests.

    ``progress`` (training step, target, ETA, loss per job kind), ``stages`` (a source's path) and ``job()`` (a
    worker job's duration and failure) are the hooks the worker and the service call.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        dlq_reasons: Iterable[str] = (),
        volumes: Mapping[str, Path | str] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(registry)
        # -- process: readiness (Service sets its probe), the registry's epoch (Jobs.export_gauges), disk
        self.ready = ready_gauge(registry)
        self.registry_latest_epoch = registry_latest_epoch_gauge(registry)
        registry.register(VolumeCollector(volumes or {}, used=("spool", "cache")))
        # -- ingest
        self.messages_ingested = Counter(
            "cdm_messages_ingested", "Kafka records accepted (staged or applied).", registry=registry
        )
        self.bytes_ingested = Counter("cdm_bytes_ingested", "Bytes of Kafka record values accepted.", registry=registry)
        self.dlq_messages = Counter(
            "cdm_dlq_messages", "Records sent to the dead-letter topic, by reason.", ["reason"], registry=registry
        )
        for reason in dlq_reasons:
            self.dlq_messages.labels(reason=reason)
        self.consumer_lag = Gauge(
            "cdm_consumer_lag_messages",
            "Records not yet consumed, summed over this member's partitions (fetch high watermark - position).",
            registry=registry,
        )
        self.staged_bytes = Gauge(
            "cdm_staged_bytes", "Bytes of source data staged in the spool, not yet trained.", registry=registry
        )
        self.sources_sealed = Counter(
            "cdm_sources_sealed", "Sources sealed (complete) and queued for training.", registry=registry
        )
        self.ingest_failures = Counter(
            "cdm_ingest_failures",
            "Infrastructure failures of the ingest loop (records rewound, then retried after a back-off), by kind "
            "(record: spool I/O or a callback while handling one; poll: the broker; dlq: a dead-letter copy not "
            "acknowledged).",
            ["kind"],
            registry=registry,
        )
        self.spool_quarantined = Counter(
            "cdm_spool_quarantined",
            "Damaged spool sources or tombstones moved aside (ROOT/quarantine) when the spool was opened.",
            registry=registry,
        )
        self.spool_sources = Gauge(
            "cdm_spool_sources", "Sources the spool holds, by state (staged, sealed, registered).", ["state"],
            registry=registry,
        )  # fmt: skip
        for state in SPOOL_STATES:
            self.spool_sources.labels(state=state)
        self.spool_oldest_unsealed_age = Gauge(
            "cdm_spool_oldest_unsealed_age_seconds",
            "Age of the oldest staged source without a seal (since its first chunk was staged); 0 when none.",
            registry=registry,
        )
        self.spool_limit_bytes = Gauge(
            "cdm_spool_limit_bytes",
            "The spool's cap on staged payload bytes ([daemon] spool_max_bytes); at it new chunks are refused.",
            registry=registry,
        )
        # -- a source's path: staged -> sealed -> training -> registered -> served
        self.source_stage_seconds = Histogram(
            "cdm_source_stage_seconds",
            "Time a source took to reach a stage from the previous one (sealed: since its first chunk was staged; "
            "training: queued after the seal; registered: training; served: until this daemon's hot swap served it).",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=registry,
        )
        for stage in STAGES:
            self.source_stage_seconds.labels(stage=stage)
        # -- training
        self.training_seconds = Histogram(
            "cdm_training_seconds",
            "Wall time to train one compartment.",
            buckets=TRAINING_BUCKETS,
            registry=registry,
        )
        self.training_loss = Gauge(
            "cdm_training_loss", "Latest training loss of the compartment being trained.", registry=registry
        )
        self.compartments_trained = Counter(
            "cdm_compartments_trained", "Compartments trained and activated.", registry=registry
        )
        # progress of the job in training, per job kind (series exist only while a job of that kind trains)
        self.training_step = Gauge(
            "cdm_training_step", "Step the job in training has reached.", ["kind"], registry=registry
        )
        self.training_target_step = Gauge(
            "cdm_training_target_step", "Step at which the job in training ends.", ["kind"], registry=registry
        )
        self.training_eta = Gauge(
            "cdm_training_eta_seconds",
            "Estimated seconds until the job in training ends (at its step rate since it started or resumed).",
            ["kind"],
            registry=registry,
        )
        self.training_steps = Counter(
            "cdm_training_steps", "Training steps run (throughput: rate()).", ["kind"], registry=registry
        )
        # worker jobs: duration and failures per kind; forget requests as they arrive
        self.job_seconds = Histogram(
            "cdm_job_seconds",
            "Wall time of one worker job (train, retrain-router, forget-source, forget-samples), failed ones included.",
            ["kind"],
            buckets=JOB_BUCKETS,
            registry=registry,
        )
        self.job_failures = Counter(
            "cdm_job_failures",
            "Worker jobs that raised (the record stays uncommitted; the error is in /status and the log).",
            ["kind"],
            registry=registry,
        )
        self.jobs_queued = Gauge("cdm_jobs_queued", "Jobs waiting for the worker.", registry=registry)
        self.forget_requests = Counter(
            "cdm_forget_requests", "Forget requests received on the control topic, by kind.", ["kind"],
            registry=registry,
        )  # fmt: skip
        for kind in JOB_KINDS:
            self.training_steps.labels(kind=kind)
            self.job_seconds.labels(kind=kind)
            self.job_failures.labels(kind=kind)
        for kind in FORGET_KINDS:
            self.forget_requests.labels(kind=kind)
        # -- registry and serving
        self.compartments_active = Gauge(
            "cdm_compartments_active", "Compartments in the active composition.", registry=registry
        )
        self.router_accuracy = Gauge(
            "cdm_router_accuracy", "Held-out accuracy of the active router (0..1).", registry=registry
        )
        self.forgetting_seconds = Histogram(
            "cdm_forgetting_seconds",
            "Time from a forget request to the composition without the source (router retrain included).",
            buckets=FORGETTING_BUCKETS,
            registry=registry,
        )
        self.progress = TrainingProgress(self, clock=clock)
        self.stages = SourceStages(self.source_stage_seconds, clock=clock)

    @contextmanager
    def job(self, kind: str) -> Iterator[None]:
        """Around one worker job: its duration, a failure if it raises, and its progress series removed at the end."""
        started = time.perf_counter()
        try:
            yield
        except Exception:
            self.job_failures.labels(kind=kind).inc()
            raise
        finally:
            self.job_seconds.labels(kind=kind).observe(time.perf_counter() - started)
            self.progress.finish(kind)


class TrainingProgress:
    """The training job's step, target step, loss and ETA, from the worker's ``on_step`` callback.

    The ETA is the remaining steps at the step rate since the job started (or resumed from a checkpoint).
    """

    def __init__(self, metrics: Metrics, *, clock: Callable[[], float] = time.time) -> None:
        self._m = metrics
        self._clock = clock
        self._lock = threading.Lock()
        self._runs: dict[str, tuple[float, int, int]] = {}  # kind -> (started at, first step seen, last step)

    def step(self, kind: str, source: str, step: int, target: int, loss: float) -> None:
        """One training step of ``source`` by a job of ``kind`` (``step`` counts from 1; ``target`` is the last)."""
        now = self._clock()
        with self._lock:
            run = self._runs.get(kind)
            if run is None or step <= run[2]:  # a new job (or a restart from an earlier checkpoint)
                run = (now, step, step)
                self._m.stages.reached(source, "training")
            else:
                self._m.training_steps.labels(kind=kind).inc(step - run[2])
            started, first, _ = run
            self._runs[kind] = (started, first, step)
        m = self._m
        m.training_loss.set(loss)
        m.training_step.labels(kind=kind).set(step)
        m.training_target_step.labels(kind=kind).set(target)
        done = step - first
        rate = done / (now - started) if done > 0 and now > started else 0.0
        m.training_eta.labels(kind=kind).set(max(0, target - step) / rate if rate > 0 else math.nan)

    def finish(self, kind: str) -> None:
        """The job of ``kind`` ended (done, interrupted or failed): its progress series disappear."""
        with self._lock:
            self._runs.pop(kind, None)
        for gauge in (self._m.training_step, self._m.training_target_step, self._m.training_eta):
            try:
                gauge.remove(kind)
            except KeyError:
                continue  # a job without training steps (retrain-router, forget-source) has none


class SourceStages:
    """Per-stage timing of each source's path: staged -> sealed -> training -> registered -> served.

    ``reached(source, stage)`` observes the time since the source reached the previous stage (or since ``since``,
    for "sealed": the first chunk's staging time) in ``cdm_source_stage_seconds{stage}``. A stage reached again is
    ignored (a resumed job, a redelivered seal); a stage whose predecessor was not seen on this daemon (a restart,
    another replica) starts the timing without an observation. At most ``capacity`` sources are followed (the
    oldest are dropped); a source leaves when served or forgotten.
    """

    def __init__(self, histogram: Histogram, *, capacity: int = 4096, clock: Callable[[], float] = time.time) -> None:
        if capacity < 1:
            raise ValueError(f"SourceStages capacity = {capacity} must be >= 1")
        self._histogram = histogram
        self._capacity = capacity
        self._clock = clock
        self._lock = threading.Lock()
        self._at: OrderedDict[str, tuple[int, float]] = OrderedDict()  # source -> (stage index, reached at)

    def reached(self, source: str, stage: str, *, since: float | None = None) -> None:
        index = STAGES.index(stage)  # ValueError names the unknown stage
        now = self._clock()
        with self._lock:
            previous = self._at.get(source)
            if previous is not None and previous[0] == index:
                return
            if since is not None:
                self._histogram.labels(stage=stage).observe(max(0.0, now - since))
            elif previous is not None and previous[0] == index - 1:
                self._histogram.labels(stage=stage).observe(max(0.0, now - previous[1]))
            elif stage == STAGES[-1]:
                return  # served, but this daemon did not see it registered: nothing to time
            if stage == STAGES[-1]:
                self._at.pop(source, None)
                return
            self._at[source] = (index, now)
            self._at.move_to_end(source)
            while len(self._at) > self._capacity:
                self._at.popitem(last=False)

    def discard(self, source: str) -> None:
        """Stop following ``source`` (forgotten or dropped)."""
        with self._lock:
            self._at.pop(source, None)

    def __len__(self) -> int:
        return len(self._at)
