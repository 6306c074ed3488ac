"""daemon/jobs.py: the periodic job bodies, called directly with their dependencies (real Redis, real spool)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import redis
from prometheus_client import CollectorRegistry

from cdm.artifacts import DirectoryStore
from cdm.config import LibraryConfig
from cdm.data import load_digits
from daemon.config import DaemonConfig, SchedulerConfig
from daemon.jobs import GC_LOCK, ROUTER_LOCK, Jobs, Quiet, build_scheduler
from daemon.metrics import Metrics
from daemon.spool import Spool
from daemon.worker import Job, Notices, TrainingWorker
from registry.coordination import Coordinator
from registry.keys import Keys
from registry.writer import Registry


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_jobs(tmp_path: Path, client: redis.Redis, keys: Keys, daemon_id: str, clock: Clock) -> Jobs:
    registry, coordinator = Registry(client, keys), Coordinator(client, keys)
    spool = Spool(tmp_path / daemon_id / "spool", clock=clock, monotonic=clock)
    worker = TrainingWorker(  # not started: submitted jobs stay queued where the test can see them
        registry=registry,
        coordinator=coordinator,
        spool=spool,
        store=DirectoryStore(tmp_path / daemon_id / "artifacts"),
        work_root=tmp_path / daemon_id / "artifacts",
        library=LibraryConfig(),
        daemon_id=daemon_id,
        lock_ttl_s=60.0,
        notices=Notices(lambda _: None, lambda _: None, lambda _: None, lambda *_: None, lambda *_: None),
    )
    return Jobs(
        spool=spool,
        worker=worker,
        registry=registry,
        coordinator=coordinator,
        metrics=Metrics(CollectorRegistry(), clock=clock),
        daemon=DaemonConfig(router_debounce_s=10.0),
        daemon_id=daemon_id,
        heartbeat=lambda: None,
        clock=clock,
        wall_clock=clock,
    )


def queued(worker: TrainingWorker) -> list[Job]:
    jobs = []
    while worker.pending():
        jobs.append(worker._jobs.get_nowait())
    return jobs


@pytest.fixture
def keys(redis_namespace: str) -> Keys:
    return Keys(redis_namespace)


def test_router_check_is_debounced_and_runs_on_one_replica(
    tmp_path: Path, redis_client: redis.Redis, keys: Keys
) -> None:
    clock = Clock()
    a = make_jobs(tmp_path, redis_client, keys, "a", clock)
    b = make_jobs(tmp_path, redis_client, keys, "b", clock)
    a.router_check()
    assert a.worker.pending() == 0, "nothing active: nothing to route"
    rec = a.registry.begin_training("shoes", "fp", {})
    a.registry.activate(
        rec.compartment_id, artifact_uri="/a", sha256={}, prior=1.0, class_counts=[1], n_samples=1, train_metrics={}
    )
    a.router_check()  # unrouted since now: wait for the set of compartments to settle
    b.router_check()
    assert a.worker.pending() == b.worker.pending() == 0
    clock.now += 10.5
    a.router_check()
    b.router_check()  # a holds the router lock: b leaves it to a
    assert queued(a.worker) == [Job("retrain-router", release_lock=ROUTER_LOCK)]
    assert b.worker.pending() == 0
    assert a.coordinator.acquire_job_lock(ROUTER_LOCK, "c", 1.0) is False  # held until the job releases it


def test_garbage_collection_takes_and_releases_its_lock(tmp_path: Path, redis_client: redis.Redis, keys: Keys) -> None:
    jobs = make_jobs(tmp_path, redis_client, keys, "a", Clock())
    jobs.collect_garbage()
    assert jobs.coordinator.acquire_job_lock(GC_LOCK, "other", 5.0), "released after the run"
    jobs.collect_garbage()  # another replica holds it: skipped, the lock stays theirs
    assert not jobs.coordinator.release_job_lock(GC_LOCK, "a")
    assert jobs.coordinator.release_job_lock(GC_LOCK, "other")


def test_scheduler_runs_every_job_at_its_interval(tmp_path: Path, redis_client: redis.Redis, keys: Keys) -> None:
    jobs = make_jobs(tmp_path, redis_client, keys, "a", Clock())
    sc = SchedulerConfig(heartbeat_s=1.0, seal_check_s=2.0, router_check_s=3.0, gc_s=4.0, lag_s=5.0)
    scheduler = build_scheduler(jobs, sc)
    intervals = {j.id: j.trigger.interval.total_seconds() for j in scheduler.get_jobs()}
    assert intervals == {
        "heartbeat": 1.0,
        "seal_idle_sources": 2.0,
        "router_check": 3.0,
        "collect_garbage": 4.0,
        "export_gauges": 5.0,
    }


def test_idle_sources_are_sealed_and_staged_bytes_exported(
    tmp_path: Path, redis_client: redis.Redis, keys: Keys
) -> None:
    clock = Clock()
    jobs = make_jobs(tmp_path, redis_client, keys, "a", clock)
    assert jobs.spool.stage_chunk("shoes", 0, load_digits().subset(slice(0, 8)), ("cdm.sources", 0, 0))
    jobs.export_gauges()
    staged = jobs.metrics.registry.get_sample_value("cdm_staged_bytes")
    assert staged is not None and staged == jobs.spool.staged_bytes() > 0
    jobs.spool.set_live_partitions([("cdm.sources", 0)])  # what the ingestor reports once caught up
    jobs.seal_idle_sources()
    assert jobs.worker.pending() == 0, "chunks arrived just now: not idle yet"
    clock.now += jobs.daemon.source_idle_seal_s + 1
    jobs.seal_idle_sources()
    assert queued(jobs.worker) == [Job("train", "shoes")]
    assert jobs.metrics.registry.get_sample_value("cdm_sources_sealed_total") == 1


def test_spool_and_registry_gauges_and_the_sealed_stage(tmp_path: Path, redis_client: redis.Redis, keys: Keys) -> None:
    clock = Clock()
    jobs = make_jobs(tmp_path, redis_client, keys, "a", clock)
    v = jobs.metrics.registry.get_sample_value
    jobs.export_gauges()
    assert v("cdm_spool_oldest_unsealed_age_seconds") == 0 and v("cdm_spool_sources", {"state": "staged"}) == 0
    assert jobs.spool.stage_chunk("shoes", 0, load_digits().subset(slice(0, 8)), ("cdm.sources", 0, 0))
    clock.now += 50
    Registry(redis_client, keys).set_routing("density")  # moves the registry's epoch
    jobs.export_gauges()
    assert v("cdm_spool_sources", {"state": "staged"}) == 1 and v("cdm_spool_sources", {"state": "sealed"}) == 0
    assert v("cdm_spool_oldest_unsealed_age_seconds") == 50
    assert v("cdm_registry_latest_epoch") == Registry(redis_client, keys).epoch() > 0
    # idle-sealed: the "sealed" stage is timed from the first chunk
    jobs.spool.set_live_partitions([("cdm.sources", 0)])
    clock.now += jobs.daemon.source_idle_seal_s + 1
    jobs.seal_idle_sources()
    assert v("cdm_source_stage_seconds_count", {"stage": "sealed"}) == 1
    assert v("cdm_source_stage_seconds_sum", {"stage": "sealed"}) == 50 + jobs.daemon.source_idle_seal_s + 1
    jobs.export_gauges()
    assert v("cdm_spool_sources", {"state": "sealed"}) == 1 and v("cdm_spool_oldest_unsealed_age_seconds") == 0


def test_export_gauges_survives_an_unreachable_registry(tmp_path: Path, redis_client: redis.Redis, keys: Keys) -> None:
    class Down:
        def epoch(self) -> int:
            raise redis.ConnectionError("connection refused")

    jobs = make_jobs(tmp_path, redis_client, keys, "a", Clock())
    jobs.metrics.registry_latest_epoch.set(4)
    jobs.registry = Down()  # type: ignore[assignment]
    jobs.export_gauges()  # logs, does not raise
    assert jobs.metrics.registry.get_sample_value("cdm_registry_latest_epoch") == 4


def test_a_redis_outage_is_logged_in_one_line_per_minute_not_a_traceback_per_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    outage = [True]

    def heartbeat() -> None:
        if outage[0]:
            raise redis.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    job = Quiet(heartbeat, repeat_s=60.0, clock=clock)
    with caplog.at_level(logging.INFO, logger="daemon.jobs"):
        for _ in range(150):  # 150 runs, one a second: 2.5 minutes without Redis
            job()
            clock.now += 1.0
        outage[0] = False
        job()
        job()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4 and not any(r.exc_info for r in caplog.records), lines
    assert lines[0].startswith("periodic job heartbeat: Redis unreachable for 0s (1 failed runs)")
    assert "for 60s (61 failed runs)" in lines[1] and "for 120s (121 failed runs)" in lines[2]
    assert lines[3] == "periodic job heartbeat: Redis reachable again after 150s (150 failed runs)"


def test_any_other_failure_of_a_periodic_job_is_logged_with_its_traceback_at_every_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def router_check() -> None:
        raise KeyError("a bug")

    job = Quiet(router_check, clock=Clock())
    with caplog.at_level(logging.INFO, logger="daemon.jobs"):
        job()
        job()
    assert [r.getMessage() for r in caplog.records] == ["periodic job router_check failed"] * 2
    assert all(r.exc_info is not None and r.exc_info[0] is KeyError for r in caplog.records)
