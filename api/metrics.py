"""Prometheus metrics of ``cdm serve``; every metric is registered on the registry passed in (tests build their own).

cdm_serve_requests_total{route,method,status}            requests answered
cdm_serve_request_seconds{route,method,status}           latency histogram
cdm_serve_in_flight                                      requests being answered now
cdm_serve_images_total                                   images returned
cdm_serve_principal_requests_total{principal,status}     per caller; at most [serve] metrics_max_principals
                                                         names, the rest "other" (unauthenticated: "-")
cdm_serve_epoch                                          registry epoch of the served composition (-1: none)
cdm_serve_sampling_seconds                               compute time per sampling request
cdm_serve_batch_rows / cdm_serve_batch_requests          model rows and requests per batching engine iteration
cdm_serve_audit_failures_total                           audit stream appends that failed
cdm_serve_hotswap_seconds / _hotswap_failures_total / _hotswap_last_success_timestamp_seconds / _registry_epoch /
_registry_epoch_seen / _registry_watch_errors_total{reason} / _registry_watch_last_check_timestamp_seconds /
_composition_degraded / _artifact_loads_total{kind} / _artifact_blobs_purged_total
                                                         (``SwapMetrics`` of the live composition)
cdm_ready                                                1 while /readyz answers 200 (``ReadinessPoll``)
cdm_registry_latest_epoch                                the registry's epoch, read every [serve] resync_s

This module (with ``api.process_metrics`` and ``sampler.metrics``) is the one source of serve's metric names: the
rules and dashboards of deploy/observability are checked against, or generated from, ``ServeMetrics`` and
``SwapMetrics``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from api.process_metrics import ready_gauge, registry_latest_epoch_gauge
from common.redact import safe
from common.runtime import Periodic
from sampler.metrics import SamplerMetrics

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
OTHER = "other"
UNAUTHENTICATED = "-"


class SwapMetrics(SamplerMetrics):
    """What ``sampler.live.LiveComposition`` reports (``sampler.metrics.SamplerMetrics``), named ``cdm_serve_*``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__(registry, prefix="cdm_serve")


class PrincipalLabels:
    """A bounded label set: the first ``cap`` principals seen keep their name, later ones are "other"."""

    def __init__(self, cap: int) -> None:
        self._cap = cap
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, principal: str) -> str:
        if not principal:
            return UNAUTHENTICATED
        with self._lock:
            if principal in self._seen:
                return principal
            if len(self._seen) < self._cap:
                self._seen.add(principal)
                return principal
        return OTHER


class ServeMetrics:
    """The request metrics of the app.

    Args:
        registry: where every metric is registered.
        max_principals: principals with their own label.
        served_epoch: read at scrape time (the epoch of the served composition, None when there is none).
    """

    def __init__(
        self, registry: CollectorRegistry, *, max_principals: int, served_epoch: Callable[[], int | None]
    ) -> None:
        labels = ("route", "method", "status")
        self.requests = Counter("cdm_serve_requests_total", "HTTP requests answered", labels, registry=registry)
        self.latency = Histogram(
            "cdm_serve_request_seconds", "HTTP request latency", labels, buckets=LATENCY_BUCKETS, registry=registry
        )
        self.in_flight = Gauge("cdm_serve_in_flight", "HTTP requests being answered now", registry=registry)
        self.images = Counter("cdm_serve_images_total", "Images returned by /v1/samples", registry=registry)
        self.principal_requests = Counter(
            "cdm_serve_principal_requests_total",
            "API requests per principal (bounded: the rest are 'other')",
            ("principal", "status"),
            registry=registry,
        )
        self.audit_failures = Counter(
            "cdm_serve_audit_failures_total", "Audit stream appends that failed", registry=registry
        )
        self.epoch = Gauge("cdm_serve_epoch", "Registry epoch of the served composition (-1: none)", registry=registry)
        self.epoch.set_function(lambda: float(e) if (e := served_epoch()) is not None else -1.0)
        self.ready = ready_gauge(registry)  # set by ReadinessPoll
        self.registry_latest_epoch = registry_latest_epoch_gauge(registry)
        self.principal_label = PrincipalLabels(max_principals)
        self.batch_rows = Histogram(
            "cdm_serve_batch_rows", "Model rows per batching engine iteration (guided images count twice)",
            buckets=ROW_BUCKETS, registry=registry,
        )  # fmt: skip
        self.batch_requests = Histogram(
            "cdm_serve_batch_requests", "Requests stepped together per batching engine iteration",
            buckets=ROW_BUCKETS, registry=registry,
        )  # fmt: skip

    def observe_iteration(self, rows: int, requests: int) -> None:
        """One engine iteration of the batching sampler."""
        self.batch_rows.observe(rows)
        self.batch_requests.observe(requests)

    def observe(self, *, route: str, method: str, status: int, seconds: float, principal: str | None) -> None:
        """One answered request (``principal`` None for routes outside the API, e.g. /healthz)."""
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route, method, str(status)).observe(seconds)
        if principal is not None:
            self.principal_requests.labels(self.principal_label(principal), str(status)).inc()


class ReadinessPoll:
    """Runs ``probe()`` (serve's readiness: it reads the registry's epoch from Redis) every ``interval_s`` on its own
    thread and exports the result as ``cdm_ready`` and ``cdm_registry_latest_epoch``, so a scrape never waits on
    Redis and the served epoch can be compared with the registry's by a rule.

    Args:
        probe: returns (ready, the registry's epoch or None when it could not be read); exceptions count as not ready.
        metrics: where the two gauges are.
        interval_s: seconds between two probes ([serve] resync_s).
    """

    def __init__(
        self, probe: Callable[[], tuple[bool, int | None]], metrics: ServeMetrics, *, interval_s: float
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"ReadinessPoll interval_s = {interval_s} must be > 0")
        self.probe = probe
        self.metrics = metrics
        self.interval_s = interval_s
        self._periodic = Periodic(self.poll, interval_s, name="cdm-serve-readiness")

    def poll(self) -> None:
        """Probe once and set the gauges."""
        try:
            ready, epoch = self.probe()
        except Exception as exc:  # any failure means "not ready"; the epoch keeps its last value
            log.warning("readiness probe failed: %s", safe(f"{type(exc).__name__}: {exc}"))
            ready, epoch = False, None
        self.metrics.ready.set(1.0 if ready else 0.0)
        if epoch is not None:
            self.metrics.registry_latest_epoch.set(epoch)

    def start(self) -> None:
        """Probe now, then every ``interval_s`` on a daemon thread."""
        self._periodic.start()

    def stop(self) -> None:
        self._periodic.stop()
