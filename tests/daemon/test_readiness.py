"""daemon/readiness.py and the service's health wiring: /readyz reads a cache, Redis is pinged per interval only."""

from __future__ import annotations

import http.client
import threading
import time
from pathlib import Path

import pytest
import redis

from api.health import Readiness
from cdm.errors import ConfigError
from daemon.config import load_config
from daemon.readiness import ReadinessCache
from daemon.service import Service, Started


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_cache_answers_without_checking_and_goes_stale() -> None:
    clock, calls = Clock(), []

    def check() -> Readiness:
        calls.append(clock.now)
        return Readiness(True, details={"epoch": len(calls)})

    cache = ReadinessCache(check, 2.0, clock=clock)
    assert cache.current().ready is False and "not checked yet" in cache.current().reasons[0]
    cache.refresh()
    for _ in range(100):
        assert cache.current() == Readiness(True, details={"epoch": 1})
    assert calls == [100.0]  # reading never checks
    clock.now += 6.5  # > 3 intervals without a refresh: the check is stuck
    assert cache.current().ready is False and "not refreshed for 6s" in cache.current().reasons[0]

    def broken() -> Readiness:
        raise redis.ConnectionError("Error connecting to redis://u:hunter2@h:1/0 " + "x" * 100_000)

    cache.check = broken
    reason = cache.refresh().reasons[0]
    assert "hunter2" not in reason and "redis://u:***@h:1/0" in reason and len(reason) <= 1000


def test_the_background_thread_refreshes_and_stops() -> None:
    ready = threading.Event()
    cache = ReadinessCache(lambda: Readiness(ready.is_set()), 0.05)
    stop = cache.start()
    try:
        assert cache.current().ready is False
        ready.set()
        deadline = time.monotonic() + 5
        while not cache.current().ready:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        stop()
    checks = cache.checks
    time.sleep(0.2)
    assert cache.checks == checks  # stopped


def pings(client: redis.Redis) -> int:
    stats = client.info("commandstats")
    return int(stats.get("cmdstat_ping", {}).get("calls", 0))


def test_readyz_under_load_does_not_ping_redis_per_request(
    tmp_path: Path, redis_db_url: str, redis_namespace: str
) -> None:
    """300 /readyz requests over the service's real health server: Redis sees one PING per refresh interval."""
    cfg_path = tmp_path / "config.toml"
    cfg_path.write_text(
        f'[redis]\nurl = "{redis_db_url}"\nnamespace = "{redis_namespace}"\n'
        f'[daemon]\nhttp_port = 0\nreadiness_refresh_s = 0.5\nspool_dir = "{tmp_path}/spool"\n'
        f'artifact_dir = "{tmp_path}/artifacts"\n'
    )
    service = Service(load_config(cfg_path, environ={}))
    observer = redis.Redis.from_url(redis_db_url)
    try:
        for step in service.steps:  # only what /readyz needs: no Kafka, no training
            if step.name in ("redis", "http", "readiness"):
                service._started.append(Started(step.name, step.start()))
        port = service.http_port
        assert port is not None
        before, started = pings(observer), time.monotonic()
        codes: list[int] = []

        def hammer() -> None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            for _ in range(50):
                conn.request("GET", "/readyz")
                response = conn.getresponse()
                response.read()
                codes.append(response.status)
            conn.close()

        threads = [threading.Thread(target=hammer) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - started
        sent = pings(observer) - before
        assert len(codes) == 300 and set(codes) == {503}  # Redis is fine, but no composition is loaded yet
        assert sent <= elapsed / 0.5 + 2, (sent, elapsed)  # one PING per refresh interval, not per request
        assert sent < 30
    finally:
        observer.close()
        service.teardown()


def test_invalid_http_settings_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[daemon]\nhttp_max_connections = 0\n")
    with pytest.raises(ConfigError, match=r"daemon\.http_max_connections = 0 .*must be >= 8"):
        load_config(path, environ={})
