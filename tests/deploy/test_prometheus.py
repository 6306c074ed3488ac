"""deploy/observability/prometheus: promtool checks and unit tests, and the rules' contract with the daemon.

* promtool (Debian's prometheus package) checks prometheus.yml and the rule files and runs the rule unit tests
  (tests/*.test.yml: synthetic series, each alert firing and silent).
* Metric names have one source, the metric classes: every series a rule or a promtool test uses must be one that
  the selected job registers (``Metrics(CollectorRegistry())`` of daemon/metrics.py for job="cdm-daemon",
  ``ServeMetrics`` / ``SwapMetrics`` of api/metrics.py for job="cdm-serve"), a recording rule defined here, or
  Prometheus' own ``up``.
  Expressions are parsed with promql-parser (a PromQL AST), not matched with regular expressions.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml

from tests.deploy.common import (
    OPERATIONS_DOC,
    PROMETHEUS,
    PROMETHEUS_SERIES,
    PROMTOOL_TESTS,
    RULE_FILES,
    anchors,
    daemon_series_names,
    run,
    series_names,
    tool,
)

SEVERITIES = ("critical", "warning", "info")
JOBS = ("cdm-daemon", "cdm-serve")


def _rules() -> list[dict[str, Any]]:
    return [
        rule for path in RULE_FILES for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"]
    ]


def _alerts() -> list[dict[str, Any]]:
    return [rule for rule in _rules() if "alert" in rule]


def _records() -> list[dict[str, Any]]:
    return [rule for rule in _rules() if "record" in rule]


def _selectors(expr: str) -> list[tuple[str, dict[str, tuple[str, str]]]]:
    """(metric name, {label: (operator, value)}) of every vector selector in a PromQL expression."""
    found: list[tuple[str, dict[str, tuple[str, str]]]] = []

    def visit(node: Any) -> bool:
        if isinstance(node, promql_parser.VectorSelector):
            matchers = {m.name: (str(m.op).rsplit(".", 1)[-1], m.value) for m in node.matchers.matchers}
            name = node.name
            if name is None:
                op, value = matchers.get("__name__", ("", ""))
                assert op == "Equal", f"{expr!r}: a selector without an exact metric name cannot be checked"
                name = value
            found.append((name, matchers))
        return True

    promql_parser.walk(promql_parser.parse(expr), visit)
    return found


def _promtool_tests() -> list[tuple[Path, dict[str, Any]]]:
    return [(path, group) for path in PROMTOOL_TESTS for group in yaml.safe_load(path.read_text())["tests"]]


# -- promtool -------------------------------------------------------------------------------------------------


def test_promtool_check_config() -> None:
    result = run([tool("promtool"), "check", "config", str(PROMETHEUS / "prometheus.yml")])
    assert result.returncode == 0, result.stdout + result.stderr
    # the config loads exactly the rule files of rules/ (promtool resolves rule_files relative to it)
    assert f"SUCCESS: {len(RULE_FILES)} rule files found" in result.stdout + result.stderr


def test_promtool_check_rules() -> None:
    assert RULE_FILES, "no rule files in deploy/observability/prometheus/rules"
    result = run([tool("promtool"), "check", "rules", *map(str, RULE_FILES)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_test_rules() -> None:
    assert PROMTOOL_TESTS, "no promtool tests in deploy/observability/prometheus/tests"
    result = run([tool("promtool"), "test", "rules", *(p.name for p in PROMTOOL_TESTS)], cwd=PROMETHEUS / "tests")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert output.count("SUCCESS") == len(PROMTOOL_TESTS), output


# -- one source of truth for metric names ---------------------------------------------------------------------


def test_rules_use_only_metrics_their_job_registers() -> None:
    recorded = {rule["record"] for rule in _records()}
    unknown = set()
    for rule in _rules():
        for name, matchers in _selectors(rule["expr"]):
            job = matchers.get("job", ("", ""))[1]
            registered = series_names(job) if job in JOBS else frozenset()
            if name not in registered | recorded | PROMETHEUS_SERIES:
                unknown.add(f"{name}{{job={job!r}}} (in {rule.get('alert') or rule.get('record')})")
    assert not unknown, f"rules use series their job's metric classes do not register: {sorted(unknown)}"


def test_promtool_tests_use_only_registered_series() -> None:
    registered = series_names() | PROMETHEUS_SERIES
    recorded = {rule["record"] for rule in _records()}
    unknown: set[str] = set()
    for path, group in _promtool_tests():
        for series in group.get("input_series", []):
            unknown |= {f"{name} ({path.name})" for name, _ in _selectors(series["series"]) if name not in registered}
        for case in group.get("promql_expr_test", []):
            names = {name for name, _ in _selectors(case["expr"])}
            unknown |= {f"{name} ({path.name})" for name in names - registered - recorded - {"ALERTS"}}
    assert not unknown, f"promtool tests feed series no metric class registers: {sorted(unknown)}"


def test_the_metric_name_check_catches_a_renamed_metric() -> None:
    """The check above is only as good as the name extraction: a renamed metric must be reported."""
    registered = daemon_series_names()
    assert "cdm_hotswap_failures_total" in registered
    assert "cdm_dlq_messages_total" in registered  # labelled, no sample before the first dead letter
    assert "cdm_training_seconds_bucket" in registered
    names = {name for name, _ in _selectors('sum(rate(cdm_hotswap_failure_total{job="x"}[5m])) / on() up')}
    assert names == {"cdm_hotswap_failure_total", "up"}
    assert "cdm_hotswap_failure_total" not in registered


def test_rules_select_the_scrape_jobs() -> None:
    """Every selector names its job, and only the jobs prometheus.yml and the ServiceMonitor produce."""
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    assert set(JOBS) <= {job["job_name"] for job in config["scrape_configs"]}
    for rule in _rules():
        for name, matchers in _selectors(rule["expr"]):
            if name.startswith("cdm_") or name in PROMETHEUS_SERIES:
                assert matchers.get("job", ("", ""))[0] == "Equal", f'{rule}: {name} without job="..."'
                assert matchers["job"][1] in JOBS, f"{rule}: unknown job {matchers['job'][1]!r}"


def test_recording_rules_follow_the_naming_convention() -> None:
    """level:metric:operations, where metric is a cdm metric (counters without _total)."""
    registered = series_names()
    for rule in _records():
        match = re.fullmatch(r"([a-z_]+):([a-z0-9_]+):([a-z0-9_]+)", rule["record"])
        assert match, f"{rule['record']} is not level:metric:operations"
        metric = match[2]
        assert metric in registered or f"{metric}_total" in registered or f"{metric}_count" in registered, (
            f"{rule['record']}: {metric} is not a daemon metric"
        )


# -- alerts: labels, runbooks, tests --------------------------------------------------------------------------


def test_alerts_have_severity_summary_and_a_runbook_section() -> None:
    sections = anchors(OPERATIONS_DOC.read_text())
    names = [alert["alert"] for alert in _alerts()]
    assert len(names) == len(set(names)), f"alert names repeat: {names}"
    for alert in _alerts():
        name = alert["alert"]
        assert alert["labels"]["severity"] in SEVERITIES, name
        annotations = alert["annotations"]
        assert {"summary", "description", "runbook_url"} <= set(annotations), name
        assert annotations["runbook_url"] == f"docs/operations.md#{name.lower()}", name
        assert name.lower() in sections, f"docs/operations.md has no section for {name} (heading '### {name}')"


def test_every_alert_is_tested_firing_and_silent() -> None:
    fires: set[str] = set()
    silent: set[str] = set()
    for _, group in _promtool_tests():
        for case in group.get("alert_rule_test", []):
            (fires if case.get("exp_alerts") else silent).add(case["alertname"])
    names = {alert["alert"] for alert in _alerts()}
    assert names - fires == set(), f"alerts never tested firing: {sorted(names - fires)}"
    assert names - silent == set(), f"alerts never tested staying silent: {sorted(names - silent)}"
    assert (fires | silent) - names == set(), f"tests of alerts that do not exist: {sorted((fires | silent) - names)}"


def test_every_recording_rule_is_tested() -> None:
    """Each recording rule is read by some promql_expr_test (directly, or inside e.g. round() for ratios)."""
    tested = {
        name
        for _, group in _promtool_tests()
        for case in group.get("promql_expr_test", [])
        for name, _ in _selectors(case["expr"])
    }
    untested = {rule["record"] for rule in _records()} - tested
    assert not untested, f"recording rules without a promql_expr_test: {sorted(untested)}"


@pytest.mark.parametrize("path", PROMTOOL_TESTS, ids=lambda p: p.name)
def test_promtool_tests_load_the_rule_files(path: Path) -> None:
    """Each test file loads rule files of rules/ by relative path, so the tests run against the shipped rules."""
    doc = yaml.safe_load(path.read_text())
    loaded = {(path.parent / name).resolve() for name in doc["rule_files"]}
    assert loaded and loaded <= {p.resolve() for p in RULE_FILES}, doc["rule_files"]


def test_promtool_tests_use_real_dead_letter_reasons() -> None:
    """The `reason` label of the synthetic dead-letter series is one the daemon sends (daemon.wire.REASONS)."""
    from daemon.wire import REASONS

    used = {
        matchers["reason"][1]
        for _, group in _promtool_tests()
        for series in group.get("input_series", [])
        for name, matchers in _selectors(series["series"])
        if name == "cdm_dlq_messages_total"
    }
    assert used and used <= set(REASONS), sorted(used - set(REASONS))


# -- the Prometheus of deploy/local (the live test's) --------------------------------------------------------------


def test_local_prometheus_config_is_valid_and_uses_the_shipped_jobs_and_rules(tmp_path: Path) -> None:
    import json

    from deploy.local.services import PROMETHEUS_JOBS, ServicesError, prometheus_config

    shipped = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    assert set(PROMETHEUS_JOBS) <= {job["job_name"] for job in shipped["scrape_configs"]}
    config = prometheus_config({"cdm-daemon": ["127.0.0.1:9464"], "cdm-serve": ["127.0.0.1:8000"]})
    assert {Path(p) for p in config["rule_files"]} == {p.resolve() for p in RULE_FILES}  # type: ignore[union-attr]
    path = tmp_path / "prometheus.json"
    path.write_text(json.dumps(config))
    result = run([tool("promtool"), "check", "config", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr
    with pytest.raises(ServicesError, match="unknown scrape job"):
        prometheus_config({"daemon": ["127.0.0.1:1"]})
