"""deploy/observability/grafana: the dashboards are generated, valid for Grafana, and query only real series.

* The committed JSON is what ``python -m deploy.observability.grafana.build`` renders (grafana-foundation-sdk).
* Grafana itself is not installable here and no package ships its dashboard JSON schema; the check is a round trip
  through grafana-foundation-sdk's models, which are generated from Grafana's schema (kinds): every field must decode
  into a model and encode back unchanged, so an unknown or misspelt field of a dashboard or a panel fails (query
  objects are open in Grafana's schema, and the round trip does not check value types: the layout is checked here).
* Every panel query is PromQL that parses (promql-parser) once the Grafana variables are substituted, selects
  ``job=~"$job"``, and names only series the dashboard's job registers (its metric classes) or recording rules.
  tests/deploy/test_live_prometheus.py then runs each query against a real Prometheus.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import Dashboard

from deploy.observability.grafana import build
from tests.deploy.common import GRAFANA, PROMETHEUS_SERIES, RULE_FILES, series_names
from tests.deploy.test_prometheus import _selectors

DASHBOARDS = GRAFANA / "dashboards"
JOB_OF = {"cdm-overview.json": "cdm-daemon", "cdm-serving.json": "cdm-serve"}
# what Grafana puts in for its variables when the test parses a query (the live test resolves them for real)
VARIABLES = {"$__rate_interval": "1m", "$job": "cdm-daemon", "$instance": ".*"}


def load(filename: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((DASHBOARDS / filename).read_text())
    return doc


def targets(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(panel title, target) of every query of a dashboard."""
    return [(p["title"], t) for p in doc["panels"] if p["type"] != "row" for t in p.get("targets", [])]


def substitute(expr: str) -> str:
    for variable, value in VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr


def round_trip(doc: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(json.dumps(Dashboard.from_json(copy.deepcopy(doc)), cls=JSONEncoder))
    return out


def test_the_committed_dashboards_are_generated() -> None:
    rendered = build.render()
    assert sorted(rendered) == sorted(p.name for p in DASHBOARDS.glob("*.json")), "a dashboard is not generated"
    for filename, text in rendered.items():
        assert (DASHBOARDS / filename).read_text() == text, (
            f"{filename} differs from the generator: run `python -m deploy.observability.grafana.build`"
        )
    assert build.main(["--check"]) == 0


@pytest.mark.parametrize("filename", sorted(JOB_OF))
def test_dashboards_decode_into_grafanas_schema_models(filename: str) -> None:
    doc = load(filename)
    assert round_trip(doc) == doc
    assert doc["uid"] and doc["schemaVersion"] >= 36 and doc["title"].startswith("cdm / ")


def test_the_round_trip_catches_a_field_grafana_does_not_know() -> None:
    doc = load("cdm-overview.json")
    broken = copy.deepcopy(doc)
    panel = next(p for p in broken["panels"] if p["type"] == "timeseries")
    panel["titel"] = panel.pop("title")  # a typo in a field name
    assert round_trip(broken) != broken


@pytest.mark.parametrize("filename", sorted(JOB_OF))
def test_panels_lie_on_grafanas_24_column_grid(filename: str) -> None:
    for p in load(filename)["panels"]:
        pos = p["gridPos"]
        assert all(isinstance(pos[k], int) and pos[k] >= 0 for k in ("x", "y", "w", "h")), p["title"]
        assert pos["x"] + pos["w"] <= 24 and pos["h"] >= 1, p["title"]


@pytest.mark.parametrize("filename", sorted(JOB_OF))
def test_panels_query_only_series_their_job_registers(filename: str) -> None:
    doc = load(filename)
    registered = series_names(JOB_OF[filename]) | PROMETHEUS_SERIES
    records = {
        r["record"]
        for p in RULE_FILES
        for g in yaml.safe_load(p.read_text())["groups"]
        for r in g["rules"]
        if "record" in r
    }
    found = targets(doc)
    assert len(found) >= 15, f"{filename}: only {len(found)} queries"
    for title, target in found:
        expr = target["expr"]
        selectors = _selectors(substitute(expr))
        assert selectors, f"{filename} / {title}: {expr!r} selects nothing"
        for series, matchers in selectors:
            assert series in registered | records, f"{filename} / {title}: {series} is not a series of this job"
            assert "job" in matchers, f'{filename} / {title}: {series} without job=~"$job"'
        assert '"$job"' in expr, f"{filename} / {title}: the query ignores the job variable"


@pytest.mark.parametrize("filename", sorted(JOB_OF))
def test_panels_datasource_ids_and_variables(filename: str) -> None:
    doc = load(filename)
    provisioned = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    uid = provisioned["datasources"][0]["uid"]
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids)), f"{filename}: panel ids repeat"
    for title, target in targets(doc):
        assert target["datasource"]["uid"] == uid, title
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert set(variables) == {"job", "instance"}
    assert variables["job"]["current"]["value"] == JOB_OF[filename]
    assert variables["instance"]["includeAll"] and variables["instance"]["allValue"] == ".*"
    for variable in variables.values():
        for series, _ in _selectors(variable["query"].removeprefix("label_values(").rsplit(",", 1)[0]):
            assert series in series_names(JOB_OF[filename]), f"{filename}: variable {variable['name']} on {series}"


def test_grafana_provisioning_points_at_the_dashboards() -> None:
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "cdm.yml").read_text())["providers"][0]
    assert provider["type"] == "file" and Path(provider["options"]["path"]).name == "dashboards"
