"""Periodic jobs (APScheduler 3): heartbeat, sealing idle sources, router retraining, garbage collection.

Every job has ``max_instances=1``, ``coalesce=True`` and an explicit ``misfire_grace_time``. Jobs that must run
on one replica only (router retraining, garbage collection) take a Redis job lock first. While Redis is
unreachable the jobs that need it fail at every run; :class:`Quiet` logs that in one line when it starts, once a
minute while it lasts and once when it ends (not a traceback per run: 3 a second with the default intervals).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import redis
from apscheduler.schedulers.background import BackgroundScheduler

from common.redact import safe
from daemon.config import DaemonConfig, SchedulerConfig
from daemon.metrics import Metrics
from daemon.spool import Spool, SpoolError, SpoolState
from daemon.worker import Job, TrainingWorker, is_outage
from registry.coordination import Coordinator
from registry.reader import RegistryClient

log = logging.getLogger(__name__)

ROUTER_LOCK = "router"
GC_LOCK = "gc"


class Jobs:
    """The job bodies, separate from the scheduler so tests can call them directly.

    Args:
        spool: staged source chunks (idle sources are sealed from here).
        worker: where sealed sources and router retraining are submitted.
        registry: the composition (is the router up to date?).
        coordinator: the job locks that keep router retraining and garbage collection on one replica.
        metrics: the daemon's metrics (sources sealed, staged bytes).
        daemon: ``[daemon]``: idle-seal delay, router debounce, lock lease, garbage-collection grace.
        daemon_id: this replica's id (the job locks' owner).
        heartbeat: refreshes this daemon's heartbeat in the registry.
        clock: monotonic seconds, the clock of ``WorkerStatus.router_dirty_since`` (injectable for tests).
        wall_clock: unix seconds, the spool's clock (its chunks' ``staged_at``), for the age of unsealed sources.
    """

    def __init__(
        self,
        *,
        spool: Spool,
        worker: TrainingWorker,
        registry: RegistryClient,
        coordinator: Coordinator,
        metrics: Metrics,
        daemon: DaemonConfig,
        daemon_id: str,
        heartbeat: Callable[[], None],
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.spool = spool
        self.worker = worker
        self.registry = registry
        self.coordinator = coordinator
        self.metrics = metrics
        self.daemon = daemon
        self.daemon_id = daemon_id
        self._heartbeat = heartbeat
        self._clock = clock
        self._wall_clock = wall_clock
        self._unrouted_since: float | None = None

    def heartbeat(self) -> None:
        self._heartbeat()

    def seal_idle_sources(self) -> None:
        """Seal sources whose chunks stopped arriving ``source_idle_seal_s`` ago (no seal message came)."""
        idle_s = self.daemon.source_idle_seal_s
        for source in self.spool.idle_sources(idle_s):
            try:
                if self.spool.seal_idle(source) is not None:
                    log.info("sealed idle source %s after %.0fs without chunks", source, idle_s)
                    self.metrics.sources_sealed.inc()
                    self.metrics.stages.reached(source, "sealed", since=first_staged_at(self.spool, source))
                    self.worker.submit(Job("train", source))
            except Exception as exc:  # a broken source must not stop the other jobs
                log.warning("could not seal idle source %s: %s", source, exc)

    def router_check(self) -> None:
        """Retrain the router (debounced, one replica) when it does not cover exactly the active compartments.

        Only a learnt router is trained; ``[router] kind = "density"`` needs none."""
        if self.worker.router_kind != "learnt":
            return
        snap = self.registry.snapshot()
        routed = set(snap.router.compartment_ids) if snap.router else set()
        active = set(snap.compartment_ids)
        dirty = routed != active and bool(active)
        local = self.worker.status.router_dirty_since
        now = self._clock()
        if not dirty and local is None:
            self._unrouted_since = None
            return
        if self._unrouted_since is None:
            self._unrouted_since = local if local is not None else now
        if now - self._unrouted_since < self.daemon.router_debounce_s or not self.worker.idle():
            return
        ttl = max(600.0, 4 * self.daemon.lock_ttl_s)
        if not self.coordinator.acquire_job_lock(ROUTER_LOCK, self.daemon_id, ttl):
            return  # another replica retrains it
        self._unrouted_since = None
        self.worker.submit(Job("retrain-router", release_lock=ROUTER_LOCK))

    def collect_garbage(self) -> None:
        if not self.coordinator.acquire_job_lock(GC_LOCK, self.daemon_id, 300.0):
            return
        try:
            deleted = self.worker.collect_garbage(self.daemon.gc_grace_s)
            if deleted:
                log.info("garbage collection deleted %d retired artifact files", len(deleted))
        finally:
            self.coordinator.release_job_lock(GC_LOCK, self.daemon_id)

    def export_gauges(self) -> None:
        """The spool's gauges, then the registry's epoch (last: it needs Redis)."""
        m = self.metrics
        m.staged_bytes.set(self.spool.staged_bytes())
        staged = self.spool.sources(SpoolState.STAGED)
        for state in SpoolState:
            count = len(staged) if state is SpoolState.STAGED else len(self.spool.sources(state))
            m.spool_sources.labels(state=state.value).set(count)
        firsts = [t for source in staged if (t := first_staged_at(self.spool, source)) is not None]
        m.spool_oldest_unsealed_age.set(max(0.0, self._wall_clock() - min(firsts)) if firsts else 0.0)
        try:
            m.registry_latest_epoch.set(self.registry.epoch())
        except redis.RedisError as exc:  # readiness reports Redis down; the gauge keeps its last value
            log.warning("cannot read the registry's epoch for cdm_registry_latest_epoch: %s", safe(exc))


def first_staged_at(spool: Spool, source: str) -> float | None:
    """Unix time the spool staged the first chunk of ``source``; None when it holds none (dropped meanwhile)."""
    try:
        chunks = spool.lineage(source).chunks
    except SpoolError:
        return None
    return min((c.staged_at for c in chunks), default=None)


class Quiet:
    """A job body as the scheduler runs it: a Redis outage is logged when it starts, every ``repeat_s`` while it
    lasts and when it ends, in one line each; any other failure with its traceback, at every run.

    Args:
        func: the job body.
        repeat_s: seconds between two "still unreachable" lines.
        clock: monotonic seconds (injectable for tests).
    """

    def __init__(
        self, func: Callable[[], None], *, repeat_s: float = 60.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.func = func
        self.name = getattr(func, "__name__", repr(func))
        self.repeat_s = repeat_s
        self.clock = clock
        self.failing_since: float | None = None  # first failed run of the outage in progress
        self.failures = 0  # failed runs in the outage in progress
        self._next_log = 0.0

    def __call__(self) -> None:
        try:
            self.func()
        except Exception as exc:
            if not is_outage(exc):
                log.exception("periodic job %s failed", self.name)
                return
            now = self.clock()
            self.failures += 1
            if self.failing_since is None:
                self.failing_since = now
            if now >= self._next_log:
                self._next_log = now + self.repeat_s
                log.warning(
                    "periodic job %s: Redis unreachable for %.0fs (%d failed runs): %s",
                    self.name,
                    now - self.failing_since,
                    self.failures,
                    exc,
                )
            return
        if self.failing_since is not None:
            log.info(
                "periodic job %s: Redis reachable again after %.0fs (%d failed runs)",
                self.name,
                self.clock() - self.failing_since,
                self.failures,
            )
            self.failing_since, self.failures, self._next_log = None, 0, 0.0


def build_scheduler(jobs: Jobs, sc: SchedulerConfig) -> BackgroundScheduler:
    """A BackgroundScheduler running every job of ``jobs`` at the intervals of ``[scheduler]`` (not started)."""
    scheduler = BackgroundScheduler(
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": int(sc.misfire_grace_s)},
        timezone="UTC",
    )
    for func, seconds in (
        (jobs.heartbeat, sc.heartbeat_s),
        (jobs.seal_idle_sources, sc.seal_check_s),
        (jobs.router_check, sc.router_check_s),
        (jobs.collect_garbage, sc.gc_s),
        (jobs.export_gauges, sc.lag_s),
    ):
        scheduler.add_job(Quiet(func), "interval", seconds=seconds, id=func.__name__, name=func.__name__)
    return scheduler
