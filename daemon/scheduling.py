"""Periodic jobs (APScheduler 3): heartbeat, sealing idle sources, router retraining, garbage collection.

Every job has ``max_instances=1``, ``coalesce=True`` and an explicit ``misfire_grace_time``. Jobs that must run
on one replica only (router retraining, garbage collection) take a Redis job lock first.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from apscheduler.schedulers.background import BackgroundScheduler

from daemon.training_worker import Job

if TYPE_CHECKING:
    from daemon.service import Service

log = logging.getLogger(__name__)

ROUTER_LOCK = "router"
GC_LOCK = "gc"


class Jobs:
    """The job bodies, separate from the scheduler so tests can call them directly."""

    def __init__(self, service: Service) -> None:
        self.s = service
        self._unrouted_since: float | None = None

    def heartbeat(self) -> None:
        self.s.heartbeat()

    def seal_idle_sources(self) -> None:
        """Seal sources whose chunks stopped arriving ``source_idle_seal_s`` ago (no seal message came)."""
        idle_s = self.s.cfg.daemon.source_idle_seal_s
        for source in self.s.spool.idle_sources(idle_s):
            try:
                if self.s.spool.seal_idle(source) is not None:
                    log.info("sealed idle source %s after %.0fs without chunks", source, idle_s)
                    self.s.metrics.sources_sealed.inc()
                    self.s.worker.submit(Job("train", source))
            except Exception as exc:  # a broken source must not stop the other jobs
                log.warning("could not seal idle source %s: %s", source, exc)

    def router_check(self) -> None:
        """Retrain the router (debounced, one replica) when it does not cover exactly the active compartments."""
        snap = self.s.registry.snapshot()
        routed = set(snap.router.compartment_ids) if snap.router else set()
        active = set(snap.compartment_ids)
        dirty = routed != active and bool(active)
        local = self.s.worker.status.router_dirty_since
        now = time.monotonic()
        if not dirty and local is None:
            self._unrouted_since = None
            return
        if self._unrouted_since is None:
            self._unrouted_since = local if local is not None else now
        if now - self._unrouted_since < self.s.cfg.daemon.router_debounce_s or not self.s.worker.idle():
            return
        ttl = max(600.0, 4 * self.s.cfg.daemon.lock_ttl_s)
        if not self.s.coordinator.acquire_job_lock(ROUTER_LOCK, self.s.daemon_id, ttl):
            return  # another replica retrains it
        self._unrouted_since = None
        self.s.worker.submit(Job("retrain-router", release_lock=ROUTER_LOCK))

    def collect_garbage(self) -> None:
        if not self.s.coordinator.acquire_job_lock(GC_LOCK, self.s.daemon_id, 300.0):
            return
        try:
            deleted = self.s.worker.collect_garbage(self.s.cfg.daemon.gc_grace_s)
            if deleted:
                log.info("garbage collection deleted %d retired artifact files", len(deleted))
        finally:
            self.s.coordinator.release_job_lock(GC_LOCK, self.s.daemon_id)

    def export_gauges(self) -> None:
        self.s.metrics.staged_bytes.set(self.s.spool.staged_bytes())


def build_scheduler(service: Service) -> Any:
    """A BackgroundScheduler with every periodic job of the daemon (not started)."""
    sc = service.cfg.scheduler
    jobs = Jobs(service)
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
        scheduler.add_job(func, "interval", seconds=seconds, id=func.__name__, name=func.__name__)
    service.jobs = jobs
    return scheduler
