"""daemon/metrics.py: fresh registries (the health endpoints are tested in tests/api/test_health.py)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from daemon.metrics import Metrics


def test_metrics_values() -> None:
    reg = CollectorRegistry()
    m = Metrics(reg, dlq_reasons=["bad_npz", "too_large"])
    assert reg.get_sample_value("cdm_dlq_messages_total", {"reason": "bad_npz"}) == 0.0
    m.messages_ingested.inc(3)
    m.bytes_ingested.inc(1024)
    m.dlq_messages.labels(reason="too_large").inc()
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
    assert v("cdm_dlq_messages_total", {"reason": "too_large"}) == 1
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
