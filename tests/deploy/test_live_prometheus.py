"""The observability stack against real software: Debian's Prometheus scrapes a real ``cdm daemon`` and a real
``cdm serve`` (processes, loopback, the test Redis and Kafka-protocol broker) through a short scenario: two sources
are pushed and trained, sampled through serve by two principals, a malformed record is sent, one source is
forgotten. Then, through Prometheus' HTTP API:

* every query of every dashboard panel (deploy/observability/grafana/dashboards/*.json, the variables resolved as
  Grafana would: $job from its label_values query, $instance = All) returns at least one finite value over the
  scenario: a panel whose query returns nothing fails the test;
* every recording and alerting expression of the rule files evaluates without error, and Prometheus' own rule
  evaluation reports every rule healthy;
* the alert the scenario must fire (dead letters arriving, with the malformed record's reason) fires, and no other.
"""

from __future__ import annotations

import json
import math
import re
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml

from cli import main
from deploy.local import services
from deploy.local.services import PrometheusServer, start_prometheus, stop_prometheus
from registry.acl import AccessRegistry, Grant
from registry.keys import Keys
from tests.daemon.daemon_harness import REPO, DaemonEnv, daemon_env, digit_sources, http_get, metric
from tests.deploy.common import GRAFANA, RULE_FILES

pytestmark = [pytest.mark.services, pytest.mark.slow, pytest.mark.timeout(900)]

DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
EXPECTED_FIRING = {"CdmDeadLettersArriving"}
RATE_INTERVAL = "1m"  # Grafana's $__rate_interval for the datasource's 15 s timeInterval


class Prom:
    """Prometheus' HTTP API (GET, JSON); errors carry the query."""

    def __init__(self, server: PrometheusServer) -> None:
        self.url = server.url

    def get(self, path: str, **params: Any) -> Any:
        query = urllib.parse.urlencode(params, doseq=True)
        try:
            with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=30) as r:
                doc = json.load(r)
        except urllib.error.HTTPError as e:
            doc = json.load(e)
        return doc

    def data(self, path: str, **params: Any) -> Any:
        doc = self.get(path, **params)
        assert doc.get("status") == "success", f"{path} {params}: {doc.get('errorType')}: {doc.get('error')}"
        return doc["data"]


def wait(what: str, check: Any, timeout: float, env: DaemonEnv | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}" + (f"\n{env.logs()}" if env else ""))


@pytest.fixture
def env(tmp_path: Path, redis_db_url: str, kafka_bootstrap: str) -> Iterator[DaemonEnv]:
    # steps: long enough (seconds, even on an idle machine) that a few scrapes see a training in progress: the
    # progress series exist only while a job runs
    with daemon_env(tmp_path / "d", redis_db_url, kafka_bootstrap, "obs", steps=60, checkpoint_every=20) as e:
        yield e


@pytest.fixture
def serve(env: DaemonEnv, tmp_path: Path) -> Iterator[str]:
    port = services.free_port()
    config = tmp_path / "serve.toml"
    config.write_text(
        f"""
[redis]
url = "{env.redis_url}"
namespace = "{env.namespace}"
[sample]
num_inference_steps = 2
scheduler = "ddim"
vectorize = "loop"
[daemon]
artifact_dir = "{env.root}/artifacts"
[serve]
port = {port}
max_n = 4
max_steps = 4
resync_s = 0.5
metrics_max_principals = 4
"""
    )
    # up (/healthz) is enough here: the test waits for readiness itself once the daemon serves
    server = services.cdm_serve(tmp_path / "serve", config, port, ready_path="/healthz", env={"PYTHONPATH": str(REPO)})
    with server.start(timeout_s=120):
        yield f"http://127.0.0.1:{port}"


def finite(result: list[dict[str, Any]]) -> bool:
    """Some value of a query_range (matrix) or query (vector) result is a finite number."""
    for series in result:
        values = series.get("values") or ([series["value"]] if "value" in series else [])
        if any(math.isfinite(float(v)) for _, v in values):
            return True
    return False


def label_values(prom: Prom, query: str, start: float, end: float) -> list[str]:
    """Grafana's ``label_values(selector, label)`` through the series API."""
    match = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", query)
    assert match, f"unexpected variable query {query!r}"
    selector, label = match.groups()
    series = prom.data("/api/v1/series", **{"match[]": selector, "start": start, "end": end})
    return sorted({s[label] for s in series if label in s})


def test_every_panel_returns_data_and_every_rule_evaluates(
    env: DaemonEnv, serve: str, redis_db_url: str, tmp_path: Path
) -> None:
    started = time.monotonic()
    sources = digit_sources(3)
    env.start_daemon()
    daemon_port = env.http_port()
    server = start_prometheus(
        tmp_path / "prometheus",
        {"cdm-daemon": [f"127.0.0.1:{daemon_port}"], "cdm-serve": [serve.removeprefix("http://")]},
        scrape_interval_s=0.5,
    )
    prom = Prom(server)
    try:
        wait(
            "Prometheus to scrape both targets",
            lambda: (
                {t["labels"]["job"] for t in prom.data("/api/v1/targets")["activeTargets"] if t["health"] == "up"}
                == {"cdm-daemon", "cdm-serve"}
            ),
            30,
        )
        t0 = time.time() - 2
        # 1. two sources -> two compartments and a router, hot-swapped into the daemon and serve
        env.push({k: sources[k] for k in ("d0", "d1")})
        env.wait_serving({"d0", "d1"}, timeout=300)
        wait("cdm serve to become ready", lambda: httpx.get(f"{serve}/readyz", timeout=5).status_code == 200, 60, env)
        # 2. sampling through serve by two principals
        client = redis.Redis.from_url(redis_db_url)
        access = AccessRegistry(client, Keys(env.namespace))
        tokens = []
        for principal in ("alice", "bob"):
            access.grant(principal, [Grant("all")])
            tokens.append(access.create_token(principal).token)
        for i in range(4):
            r = httpx.post(
                f"{serve}/v1/samples",
                json={"n": 2, "seed": i},
                headers={"Authorization": f"Bearer {tokens[i % 2]}"},
                timeout=60,
            )
            assert r.status_code == 200, r.text
        # 3. a malformed record (no cdm headers) -> dead letter
        producer = env.producer()
        producer.send(f"{env.prefix}.sources", key=b"junk", value=b"not a cdm record").get(timeout=30)
        producer.close()
        # 4. forget d1 through the control topic
        assert main(["--config", str(env.config_path), "control", "forget-source", "--source", "d1"]) == 0
        env.wait_serving({"d0"}, timeout=300)

        def sample_sources() -> list[str]:
            auth = {"Authorization": f"Bearer {tokens[0]}"}
            r = httpx.post(f"{serve}/v1/samples", json={"n": 1}, headers=auth, timeout=60)
            assert r.status_code == 200, r.text
            return list(r.json()["sources"])

        wait("serve to sample without d1", lambda: sample_sources() == ["d0"], 60, env)
        # 5. the dead-letter alert fires (rule evaluation every second)
        firing = wait(
            "CdmDeadLettersArriving to fire",
            lambda: [
                a
                for a in prom.data("/api/v1/alerts")["alerts"]
                if a["labels"]["alertname"] == "CdmDeadLettersArriving" and a["state"] == "firing"
            ],
            60,
        )
        status, text = http_get(daemon_port, "/metrics")
        reason = firing[0]["labels"]["reason"]
        assert status == 200 and metric(text, "cdm_dlq_messages_total", f'reason="{reason}"') == 1
        time.sleep(3)  # a few more scrapes after the last event
        t1 = time.time()
        scenario_s = time.monotonic() - started

        # -- every dashboard panel returns data
        empty: list[str] = []
        queries = 0
        for path in DASHBOARDS:
            doc = json.loads(path.read_text())
            variables = {v["name"]: v for v in doc["templating"]["list"]}
            jobs = label_values(prom, variables["job"]["query"], t0, t1)
            default_job = variables["job"]["current"]["value"]
            assert default_job in jobs, f"{path.name}: $job offers {jobs}, not {default_job}"
            instances = label_values(prom, variables["instance"]["query"].replace("$job", default_job), t0, t1)
            assert instances, f"{path.name}: $instance offers nothing"
            for p in doc["panels"]:
                for target in p.get("targets", []):
                    expr = (
                        target["expr"]
                        .replace("$__rate_interval", RATE_INTERVAL)
                        .replace("$job", default_job)
                        .replace("$instance", variables["instance"]["allValue"])
                    )
                    result = prom.data("/api/v1/query_range", query=expr, start=t0, end=t1, step=1)["result"]
                    queries += 1
                    if not finite(result):
                        empty.append(f"{path.name} / {p['title']}: {expr}")
        assert queries >= 40, queries
        assert not empty, "panels whose query returned no data:\n" + "\n".join(empty)

        # -- every rule expression evaluates; Prometheus' own evaluation of each rule is healthy
        rules = [r for p in RULE_FILES for g in yaml.safe_load(p.read_text())["groups"] for r in g["rules"]]
        for rule in rules:
            prom.data("/api/v1/query", query=rule["expr"], time=t1)
        evaluated = {r["name"]: r for g in prom.data("/api/v1/rules")["groups"] for r in g["rules"]}
        assert set(evaluated) == {r.get("alert") or r["record"] for r in rules}
        unhealthy = {name: r.get("lastError") for name, r in evaluated.items() if r["health"] != "ok"}
        assert not unhealthy, unhealthy

        # -- the alerts the scenario fires, and only those
        alerts = prom.data("/api/v1/alerts")["alerts"]
        fired = {a["labels"]["alertname"] for a in alerts if a["state"] == "firing"}
        assert fired == EXPECTED_FIRING, f"firing: {sorted(fired)}; all: {alerts}"
        print(f"live observability: scenario {scenario_s:.0f}s, {queries} panel queries, {len(rules)} rules")
    finally:
        stop_prometheus(server)
