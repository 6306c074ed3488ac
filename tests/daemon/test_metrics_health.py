"""daemon/metrics.py and daemon/health.py: fresh registries, real HTTP on an ephemeral port."""

from __future__ import annotations

import json
import socket
import threading
import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry

from daemon.health import HealthServer, Readiness
from daemon.metrics import Metrics


def get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], err.read()


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


class Probe:
    def __init__(self) -> None:
        self.alive = True
        self.readiness = Readiness(False, ("no composition loaded",), {"epoch": 0})

    def is_alive(self) -> bool:
        return self.alive

    def is_ready(self) -> Readiness:
        return self.readiness


@pytest.fixture
def server() -> tuple[HealthServer, Probe, Metrics]:
    reg = CollectorRegistry()
    metrics = Metrics(reg)
    probe = Probe()
    srv = HealthServer(
        "127.0.0.1", 0, registry=reg, is_alive=probe.is_alive, is_ready=probe.is_ready, status=lambda: {"epoch": 1}
    )
    srv.start()
    yield srv, probe, metrics  # type: ignore[misc]
    srv.stop()


def test_metrics_endpoint(server: tuple[HealthServer, Probe, Metrics]) -> None:
    srv, _, metrics = server
    assert srv.port > 0
    metrics.messages_ingested.inc(2)
    code, ctype, body = get(f"{srv.url}/metrics")
    assert code == 200 and ctype.startswith("text/plain")
    assert b"cdm_messages_ingested_total 2.0" in body
    assert b"# TYPE cdm_training_seconds histogram" in body


def test_healthz(server: tuple[HealthServer, Probe, Metrics]) -> None:
    srv, probe, _ = server
    code, ctype, body = get(f"{srv.url}/healthz")
    assert (code, json.loads(body)) == (200, {"alive": True})
    assert ctype == "application/json"
    probe.alive = False
    assert get(f"{srv.url}/healthz")[0] == 503

    def broken() -> bool:
        raise RuntimeError("heartbeat unknown")

    srv.is_alive = broken
    code, _, body = get(f"{srv.url}/healthz")
    assert code == 503 and "heartbeat unknown" in json.loads(body)["error"]


def test_readyz(server: tuple[HealthServer, Probe, Metrics]) -> None:
    srv, probe, _ = server
    code, _, body = get(f"{srv.url}/readyz")
    assert code == 503
    assert json.loads(body) == {"ready": False, "reasons": ["no composition loaded"], "epoch": 0}
    probe.readiness = Readiness(True, details={"epoch": 3})
    code, _, body = get(f"{srv.url}/readyz")
    assert code == 200 and json.loads(body) == {"ready": True, "reasons": [], "epoch": 3}

    def broken() -> Readiness:
        raise ConnectionError("redis down")

    srv.is_ready = broken
    code, _, body = get(f"{srv.url}/readyz")
    assert code == 503 and "redis down" in json.loads(body)["reasons"][0]


def test_readyz_accepts_a_tuple_probe_and_status(server: tuple[HealthServer, Probe, Metrics]) -> None:
    srv, _, _ = server
    srv.is_ready = lambda: (False, "no composition loaded yet")
    code, _, body = get(f"{srv.url}/readyz")
    assert (code, json.loads(body)) == (503, {"ready": False, "reasons": ["no composition loaded yet"]})
    srv.is_ready = lambda: (True, "serving epoch 3")
    code, _, body = get(f"{srv.url}/readyz")
    assert (code, json.loads(body)) == (200, {"ready": True, "reasons": [], "detail": "serving epoch 3"})
    code, _, body = get(f"{srv.url}/status")
    assert (code, json.loads(body)) == (200, {"epoch": 1})


def test_unknown_path_and_concurrent_requests(server: tuple[HealthServer, Probe, Metrics]) -> None:
    srv, _, _ = server
    assert get(f"{srv.url}/nope")[0] == 404
    codes: list[int] = []
    threads = [threading.Thread(target=lambda: codes.append(get(f"{srv.url}/metrics")[0])) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert codes == [200] * 8


def test_stop_releases_port() -> None:
    srv = HealthServer(registry=CollectorRegistry(), is_alive=lambda: True, is_ready=lambda: (True, "serving"))
    with srv:
        port = srv.port
        assert get(f"http://127.0.0.1:{port}/healthz")[0] == 200
        assert get(f"http://127.0.0.1:{port}/readyz")[0] == 200
        assert get(f"http://127.0.0.1:{port}/status")[0] == 404  # no status callable
    srv.stop()  # idempotent
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))  # free again
    with pytest.raises(RuntimeError, match="not started"):
        _ = srv.port
