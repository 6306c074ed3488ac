"""api/health.py on api/server.py: the daemon's /metrics /healthz /readyz /status over real HTTP, port 0."""

from __future__ import annotations

import json
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry

from api.health import HealthProbes, Readiness, create_health_app
from api.server import AppServer
from daemon.metrics import Metrics


def get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], err.read()


class Probe:
    def __init__(self) -> None:
        self.alive = True
        self.readiness = Readiness(False, ("no composition loaded",), {"epoch": 0})

    def is_alive(self) -> bool:
        return self.alive

    def is_ready(self) -> Readiness:
        return self.readiness


Served = tuple[AppServer, HealthProbes, Probe, Metrics]


@pytest.fixture
def server() -> Iterator[Served]:
    reg = CollectorRegistry()
    metrics = Metrics(reg)
    probe = Probe()
    app = create_health_app(reg, probe.is_alive, probe.is_ready, status=lambda: {"epoch": 1})
    srv = AppServer(app, "127.0.0.1", 0)
    srv.start()
    yield srv, app.state.probes, probe, metrics
    srv.stop()


def test_metrics_endpoint(server: Served) -> None:
    srv, _, _, metrics = server
    assert srv.port > 0
    metrics.messages_ingested.inc(2)
    code, ctype, body = get(f"{srv.url}/metrics")
    assert code == 200 and ctype.startswith("text/plain")
    assert b"cdm_messages_ingested_total 2.0" in body
    assert b"# TYPE cdm_training_seconds histogram" in body


def test_healthz(server: Served) -> None:
    srv, probes, probe, _ = server
    code, ctype, body = get(f"{srv.url}/healthz")
    assert (code, json.loads(body)) == (200, {"alive": True})
    assert ctype == "application/json"
    probe.alive = False
    assert get(f"{srv.url}/healthz")[0] == 503

    def broken() -> bool:
        raise RuntimeError("heartbeat unknown at redis://u:hunter2@h:1/0")

    probes.is_alive = broken
    code, _, body = get(f"{srv.url}/healthz")
    error = json.loads(body)["error"]
    assert code == 503 and "heartbeat unknown" in error
    assert "hunter2" not in error and "redis://u:***@h:1/0" in error


def test_readyz(server: Served) -> None:
    srv, probes, probe, _ = server
    code, _, body = get(f"{srv.url}/readyz")
    assert code == 503
    assert json.loads(body) == {"ready": False, "reasons": ["no composition loaded"], "epoch": 0}
    probe.readiness = Readiness(True, details={"epoch": 3})
    code, _, body = get(f"{srv.url}/readyz")
    assert code == 200 and json.loads(body) == {"ready": True, "reasons": [], "epoch": 3}

    def broken() -> Readiness:
        raise ConnectionError("redis down " + "x" * 100_000)

    probes.readiness = broken
    code, _, body = get(f"{srv.url}/readyz")
    reason = json.loads(body)["reasons"][0]
    assert code == 503 and "redis down" in reason and len(reason) <= 1000  # bounded


def test_readyz_accepts_a_tuple_probe_and_status(server: Served) -> None:
    srv, probes, _, _ = server
    probes.readiness = lambda: (False, "no composition loaded yet")
    code, _, body = get(f"{srv.url}/readyz")
    assert (code, json.loads(body)) == (503, {"ready": False, "reasons": ["no composition loaded yet"]})
    probes.readiness = lambda: (True, "serving epoch 3")
    code, _, body = get(f"{srv.url}/readyz")
    assert (code, json.loads(body)) == (200, {"ready": True, "reasons": [], "detail": "serving epoch 3"})
    code, _, body = get(f"{srv.url}/status")
    assert (code, json.loads(body)) == (200, {"epoch": 1})


def test_unknown_path_and_concurrent_requests(server: Served) -> None:
    srv, _, _, _ = server
    code, ctype, body = get(f"{srv.url}/nope")
    assert code == 404 and ctype == "application/json" and "/healthz" in json.loads(body)["error"]
    codes: list[int] = []
    threads = [threading.Thread(target=lambda: codes.append(get(f"{srv.url}/metrics")[0])) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert codes == [200] * 8


def test_stop_releases_port() -> None:
    app = create_health_app(CollectorRegistry(), lambda: True, lambda: (True, "serving"))
    srv = AppServer(app)
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


def test_a_taken_port_fails_at_start() -> None:
    app = create_health_app(CollectorRegistry(), lambda: True, lambda: (True, "serving"))
    with AppServer(app) as first, pytest.raises(OSError):
        AppServer(app, port=first.port).start()
