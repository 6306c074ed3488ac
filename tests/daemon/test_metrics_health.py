"""daemon/metrics.py: fresh registries (the health endpoints are tested in tests/api/test_health.py)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from daemon.metrics import Metrics
from daemon.wire import REASONS


def test_every_wire_reason_is_exported_at_zero_and_no_other() -> None:
    reg = CollectorRegistry()
    Metrics(reg, dlq_reasons=REASONS)
    for reason in REASONS:
        assert reg.get_sample_value("cdm_dlq_messages_total", {"reason": reason}) == 0.0, reason
    exported = {
        s.labels["reason"]
        for m in reg.collect()
        if m.name == "cdm_dlq_messages"
        for s in m.samples
        if s.name.endswith("_total")
    }
    assert exported == set(REASONS)
    assert reg.get_sample_value("cdm_dlq_messages_total", {"reason": "too-large"}) is None  # not a wire reason
    # without reasons nothing is pre-exported
    bare = CollectorRegistry()
    Metrics(bare)
    assert not [s for m in bare.collect() if m.name == "cdm_dlq_messages" for s in m.samples]


def test_metrics_values() -> None:
    reg = CollectorRegistry()
    m = Metrics(reg, dlq_reasons=REASONS)
    m.messages_ingested.inc(3)
    m.bytes_ingested.inc(1024)
    m.dlq_messages.labels(reason="oversized").inc()
    m.consumer_lag.set(7)
    m.staged_bytes.set(2048)
    m.training_seconds.observe(42.0)
    m.training_loss.set(0.25)
    m.compartments_active.set(2)
    m.registry_epoch.set(5)
    m.hotswap_seconds.observe(0.2)
    m.hotswap_failures.inc()
    m.router_accuracy.set(0.9)
    m.sampling_seconds.observe(1.5)
    m.forgetting_seconds.observe(12.0)
    m.sources_sealed.inc()
    m.compartments_trained.inc()
    v = reg.get_sample_value
    assert v("cdm_messages_ingested_total") == 3
    assert v("cdm_bytes_ingested_total") == 1024
    assert v("cdm_dlq_messages_total", {"reason": "oversized"}) == 1
    assert v("cdm_dlq_messages_total", {"reason": "bad-npz"}) == 0  # the others stay at 0
    assert v("cdm_consumer_lag_messages") == 7
    assert v("cdm_staged_bytes") == 2048
    assert v("cdm_training_seconds_count") == 1 and v("cdm_training_seconds_sum") == 42.0
    assert v("cdm_training_seconds_bucket", {"le": "60.0"}) == 1
    assert v("cdm_training_seconds_bucket", {"le": "30.0"}) == 0
    assert v("cdm_training_loss") == 0.25
    assert v("cdm_compartments_active") == 2
    assert v("cdm_registry_epoch") == 5
    assert v("cdm_hotswap_seconds_count") == 1
    assert v("cdm_hotswap_failures_total") == 1
    assert v("cdm_router_accuracy") == 0.9
    assert v("cdm_sampling_seconds_sum") == 1.5
    assert v("cdm_forgetting_seconds_count") == 1
    assert v("cdm_sources_sealed_total") == 1
    assert v("cdm_compartments_trained_total") == 1


def test_every_metric_is_prefixed_and_instances_do_not_collide() -> None:
    a, b = CollectorRegistry(), CollectorRegistry()
    Metrics(a)
    Metrics(b)  # a second instance on its own registry: no "Duplicated timeseries" error
    names = {metric.name for metric in a.collect()}
    assert names and all(n.startswith("cdm_") for n in names)
    assert {
        "cdm_messages_ingested",
        "cdm_dlq_messages",
        "cdm_consumer_lag_messages",
        "cdm_training_seconds",
        "cdm_hotswap_seconds",
        "cdm_forgetting_seconds",
    } <= names


# -- training progress, source stages, worker jobs, volumes ------------------------------------------------------


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_label_sets_match_the_daemon_types() -> None:
    from typing import get_args

    from daemon.metrics import JOB_KINDS, SPOOL_STATES
    from daemon.spool import SpoolState
    from daemon.worker import JobKind

    assert get_args(JobKind) == JOB_KINDS
    assert tuple(s.value for s in SpoolState) == SPOOL_STATES


def test_training_progress_step_target_eta_throughput_and_removal() -> None:
    reg, clock = CollectorRegistry(), Clock()
    m = Metrics(reg, clock=clock)
    v = reg.get_sample_value
    assert v("cdm_training_steps_total", {"kind": "train"}) == 0  # every kind starts at 0
    m.progress.step("train", "src", 1, 101, 0.9)
    assert v("cdm_training_step", {"kind": "train"}) == 1
    assert v("cdm_training_target_step", {"kind": "train"}) == 101
    eta = v("cdm_training_eta_seconds", {"kind": "train"})
    assert eta is not None and eta != eta  # NaN: no rate after one step
    clock.now += 10.0
    m.progress.step("train", "src", 11, 101, 0.5)  # 10 steps in 10 s -> 90 s left
    assert v("cdm_training_eta_seconds", {"kind": "train"}) == 90.0
    assert v("cdm_training_steps_total", {"kind": "train"}) == 10
    assert v("cdm_training_loss") == 0.5
    m.progress.finish("train")
    assert v("cdm_training_step", {"kind": "train"}) is None  # series gone while no job of the kind trains
    assert v("cdm_training_eta_seconds", {"kind": "train"}) is None
    # a resumed job: the rate counts from the resume, not from step 0
    m.progress.step("train", "src", 50, 100, 0.4)
    clock.now += 5.0
    m.progress.step("train", "src", 55, 100, 0.4)
    assert v("cdm_training_eta_seconds", {"kind": "train"}) == 45.0
    assert v("cdm_training_steps_total", {"kind": "train"}) == 15


def test_job_context_counts_duration_failures_and_clears_progress() -> None:
    reg = CollectorRegistry()
    m = Metrics(reg)
    v = reg.get_sample_value
    with m.job("retrain-router"):
        pass
    m.progress.step("train", "src", 1, 10, 0.1)
    try:
        with m.job("train"):
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    else:  # pragma: no cover
        raise AssertionError("the job's exception must propagate")
    assert v("cdm_job_seconds_count", {"kind": "retrain-router"}) == 1
    assert v("cdm_job_seconds_count", {"kind": "train"}) == 1
    assert v("cdm_job_failures_total", {"kind": "train"}) == 1
    assert v("cdm_job_failures_total", {"kind": "retrain-router"}) == 0
    assert v("cdm_training_step", {"kind": "train"}) is None


def test_source_stages_time_each_step_of_the_path() -> None:
    reg, clock = CollectorRegistry(), Clock()
    m = Metrics(reg, clock=clock)

    def count(stage: str) -> float | None:
        return reg.get_sample_value("cdm_source_stage_seconds_count", {"stage": stage})

    def total(stage: str) -> float | None:
        return reg.get_sample_value("cdm_source_stage_seconds_sum", {"stage": stage})

    m.stages.reached("a", "sealed", since=clock.now - 30)  # first chunk staged 30 s before the seal
    clock.now += 5
    m.progress.step("train", "a", 1, 10, 0.3)  # the first step marks "training"
    m.progress.step("train", "a", 2, 10, 0.3)  # later steps do not
    clock.now += 60
    m.stages.reached("a", "registered")
    clock.now += 2
    m.stages.reached("a", "served")
    m.stages.reached("a", "served")  # every later swap serves it again: not timed twice
    assert [total(s) for s in ("sealed", "training", "registered", "served")] == [30, 5, 60, 2]
    assert [count(s) for s in ("sealed", "training", "registered", "served")] == [1, 1, 1, 1]
    assert len(m.stages) == 0  # served sources are no longer followed
    # a source this daemon did not see registered (another replica) is not timed when served
    m.stages.reached("b", "served")
    assert count("served") == 1 and len(m.stages) == 0
    # forgotten sources leave; the capacity bounds what is followed
    m.stages.reached("c", "sealed")
    m.stages.discard("c")
    assert len(m.stages) == 0


def test_source_stages_capacity() -> None:
    from daemon.metrics import SourceStages

    reg = CollectorRegistry()
    stages = SourceStages(Metrics(reg).source_stage_seconds, capacity=2)
    for name in ("a", "b", "c"):
        stages.reached(name, "sealed")
    assert len(stages) == 2
    stages.reached("a", "training")  # "a" was dropped: no observation without its predecessor
    assert reg.get_sample_value("cdm_source_stage_seconds_count", {"stage": "training"}) == 0


def test_volumes_report_the_file_system_and_the_directory_size(tmp_path) -> None:
    spool = tmp_path / "spool"
    (spool / "sources" / "a").mkdir(parents=True)
    (spool / "sources" / "a" / "x.npz").write_bytes(b"x" * 1000)
    reg = CollectorRegistry()
    Metrics(reg, volumes={"spool": spool, "artifacts": tmp_path / "not-yet" / "artifacts"})
    v = reg.get_sample_value
    assert v("cdm_volume_used_bytes", {"volume": "spool"}) == 1000
    assert (v("cdm_volume_size_bytes", {"volume": "spool"}) or 0) > 0
    assert (v("cdm_volume_free_bytes", {"volume": "artifacts"}) or -1) >= 0  # its parent's file system
    assert v("cdm_volume_used_bytes", {"volume": "artifacts"}) is None  # not walked
    import pytest

    from api.process_metrics import VolumeCollector

    with pytest.raises(ValueError, match="unknown volume"):
        VolumeCollector({"/var/lib/x": tmp_path})
