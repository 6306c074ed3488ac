"""The Prometheus metrics of a sampler following the registry (the daemon's ``Metrics`` extends this class).

Every metric is registered on the ``CollectorRegistry`` passed in; no label carries user data.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

HOTSWAP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
SAMPLING_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
WATCH_ERROR_REASONS = ("registry", "record", "tombstone", "missing", "integrity", "artifact", "decode", "internal")
ARTIFACT_KINDS = ("compartment", "router")


class SamplerMetrics:
    """Hot swap, registry watch, artifact cache and sampling metrics.

    Args:
        registry: where to register (a fresh ``CollectorRegistry()`` per process or test).
        prefix: of every name ("cdm" in the daemon, "cdm_serve" in ``cdm serve``).
    """

    def __init__(self, registry: CollectorRegistry, *, prefix: str = "cdm") -> None:
        self.registry = registry
        self.registry_epoch = Gauge(
            f"{prefix}_registry_epoch", "Registry epoch of the loaded composition.", registry=registry
        )
        self.registry_epoch_seen = Gauge(
            f"{prefix}_registry_epoch_seen",
            "Newest registry epoch the watcher has read (above registry_epoch while a swap is pending or failed).",
            registry=registry,
        )
        self.registry_watch_last_check = Gauge(
            f"{prefix}_registry_watch_last_check_timestamp_seconds",
            "Unix time of the watcher's last successful read of the registry.",
            registry=registry,
        )
        self.registry_watch_errors = Counter(
            f"{prefix}_registry_watch_errors",
            "Registry checks that could not be applied in full, by reason (registry: Redis unreachable; record: "
            "a record that does not decode; tombstone: an unreadable tombstone; missing, integrity, artifact: an "
            "artifact absent, failing its sha256, or refused by the store or cache; decode: an artifact that does "
            "not load; internal: a bug). The watcher keeps running and retries at the next check.",
            ["reason"],
            registry=registry,
        )
        for reason in WATCH_ERROR_REASONS:
            self.registry_watch_errors.labels(reason=reason)
        self.composition_degraded = Gauge(
            f"{prefix}_composition_degraded",
            "1 while the sampler serves a fail-closed subset of an older composition (a new one failed to load and "
            "removed compartments are withheld), else 0.",
            registry=registry,
        )
        self.hotswap_seconds = Histogram(
            f"{prefix}_hotswap_seconds",
            "Time from noticing a new epoch to serving the new composition.",
            buckets=HOTSWAP_BUCKETS,
            registry=registry,
        )
        self.hotswap_failures = Counter(
            f"{prefix}_hotswap_failures",
            "Hot swaps that failed to load (the previous composition, less what was removed, kept serving).",
            registry=registry,
        )
        self.artifact_loads = Counter(
            f"{prefix}_artifact_loads",
            "Artifacts fetched, verified and decoded, by kind (compartments are cached by id and sha256).",
            ["kind"],
            registry=registry,
        )
        for kind in ARTIFACT_KINDS:
            self.artifact_loads.labels(kind=kind)
        self.artifact_blobs_purged = Counter(
            f"{prefix}_artifact_blobs_purged",
            "Cached artifact files deleted because a tombstone lists them (a forgotten source's files).",
            registry=registry,
        )
        self.sampling_seconds = Histogram(
            f"{prefix}_sampling_seconds",
            "Wall time of one sampling request.",
            buckets=SAMPLING_BUCKETS,
            registry=registry,
        )
