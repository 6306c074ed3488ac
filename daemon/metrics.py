"""Every Prometheus metric the daemon exports, registered on the ``CollectorRegistry`` passed in.

Names use the ``cdm_`` prefix and base units (seconds, bytes); counters end in ``_total`` in the exposition.
No label carries user data (source names, sample ids): per-source detail belongs in logs and the registry.
Tests build ``Metrics(CollectorRegistry())`` and read values with ``registry.get_sample_value(name, labels)``.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from sampler.metrics import SamplerMetrics

TRAINING_BUCKETS = (1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0)
FORGETTING_BUCKETS = (0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


class Metrics(SamplerMetrics):
    """The daemon's metrics (with those of the composition it serves, ``sampler.metrics.SamplerMetrics``).

    Args:
        registry: where to register (a fresh ``CollectorRegistry()`` per daemon or test; never the global
            default, so two instances in one process do not collide).
        dlq_reasons: dead-letter reasons to export as 0 from the start (e.g. ``daemon.wire.REASONS``), so
            rate() works before the first failure.
    """

    def __init__(self, registry: CollectorRegistry, *, dlq_reasons: Iterable[str] = ()) -> None:
        super().__init__(registry)
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
