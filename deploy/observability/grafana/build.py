"""Generate the Grafana dashboards of deploy/observability/grafana/dashboards/ with grafana-foundation-sdk.

Every query names its metrics through the metric objects themselves (``daemon.metrics.Metrics``,
``api.metrics.ServeMetrics`` / ``SwapMetrics``, ``api.process_metrics``) and its recording rules through the rule
files, so a renamed metric or rule changes (or breaks) the generated dashboards instead of leaving a panel empty.
The JSON is committed (Grafana's file provisioning reads it); tests/deploy/test_grafana.py fails when it differs
from what this module renders, and tests/deploy/test_live_prometheus.py runs every panel's query against a real
Prometheus scraping a real daemon and ``cdm serve``.

    python -m deploy.observability.grafana.build           # rewrite the dashboards
    python -m deploy.observability.grafana.build --check   # exit 1 if one is out of date
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import common as gc
from grafana_foundation_sdk.builders import dashboard as gd
from grafana_foundation_sdk.builders import prometheus as gp
from grafana_foundation_sdk.builders import stat as gstat
from grafana_foundation_sdk.builders import timeseries as gts
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import dashboard as dm
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

import api.process_metrics as pm
from api.metrics import ServeMetrics, SwapMetrics
from daemon.metrics import Metrics
from deploy.k8s.render_rules import rule_groups

ROOT = Path(__file__).resolve().parents[3]
OUT = Path(__file__).resolve().parent / "dashboards"
DATASOURCE = dm.DataSourceRef(type_val="prometheus", uid="prometheus")  # provisioning/datasources/prometheus.yml
RATE = "$__rate_interval"
SAMPLES_ROUTE = "/v1/samples"

# the metric objects whose names the queries use (registered on throw-away registries)
D = Metrics(CollectorRegistry())
S = ServeMetrics(CollectorRegistry(), max_principals=1, served_epoch=lambda: None)
W = SwapMetrics(CollectorRegistry())


def name(metric: MetricWrapperBase, suffix: str = "") -> str:
    """The exposed series name of a prometheus_client metric: counters get ``_total``, histograms ``suffix``."""
    (family,) = metric.describe()
    if family.type == "counter":
        assert not suffix, f"{family.name}: a counter has no {suffix!r} series"
        return f"{family.name}_total"
    if family.type == "histogram":
        assert suffix in ("_bucket", "_count", "_sum"), f"{family.name}: give a histogram series suffix"
        return family.name + suffix
    assert not suffix, f"{family.name} ({family.type}) has no {suffix!r} series"
    return family.name


def record(rule: str) -> str:
    """A recording rule of deploy/observability/prometheus/rules/ (KeyError when it does not exist)."""
    records = {r["record"] for g in rule_groups() for r in g["rules"] if "record" in r}
    if rule not in records:
        raise KeyError(f"no recording rule {rule!r} in the rule files; they define {sorted(records)}")
    return rule


def sel(series: str, extra: str = "", *, instance: bool = True) -> str:
    """``series{job=~"$job", instance=~"$instance", extra}``."""
    matchers = ['job=~"$job"'] + (['instance=~"$instance"'] if instance else []) + ([extra] if extra else [])
    return f"{series}{{{', '.join(matchers)}}}"


@dataclass(frozen=True)
class Q:
    expr: str
    legend: str = ""


@dataclass(frozen=True)
class P:
    title: str
    queries: tuple[Q, ...]
    unit: str = "short"
    description: str = ""
    kind: str = "timeseries"  # or "stat"
    width: int = 8
    height: int = 7


def panel(p: P, panel_id: int) -> Any:
    builder: Any
    if p.kind == "stat":
        builder = (
            gstat.Panel()
            .reduce_options(gc.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
            .graph_mode(cm.BigValueGraphMode.AREA)
        )
    else:
        builder = (
            gts.Panel()
            .legend(
                gc.VizLegendOptions()
                .show_legend(True)
                .display_mode(cm.LegendDisplayMode.LIST)
                .placement(cm.LegendPlacement.BOTTOM)
            )
            .tooltip(gc.VizTooltipOptions().mode(cm.TooltipDisplayMode.MULTI).sort(cm.SortOrder.DESCENDING))
        )
    builder = builder.id(panel_id).title(p.title).datasource(DATASOURCE).unit(p.unit).span(p.width).height(p.height)
    if p.description:
        builder = builder.description(p.description)
    for i, q in enumerate(p.queries):
        target = gp.Dataquery().expr(q.expr).ref_id(chr(ord("A") + i)).datasource(DATASOURCE)
        if q.legend:
            target = target.legend_format(q.legend)
        builder = builder.with_target(target)
    return builder


def variables(anchor: str, default_job: str) -> list[Any]:
    """$job (the scrape jobs exporting ``anchor``) and $instance (multi, "All" = every instance of $job)."""
    job = (
        gd.QueryVariable("job")
        .label("job")
        .datasource(DATASOURCE)
        .query(f"label_values({anchor}, job)")
        .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .current(dm.VariableOption(selected=True, text=default_job, value=default_job))
    )
    instance = (
        gd.QueryVariable("instance")
        .label("instance")
        .datasource(DATASOURCE)
        .query(f'label_values({anchor}{{job=~"$job"}}, instance)')
        .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .multi(True)
        .include_all(True)
        .all_value(".*")
        .current(dm.VariableOption(selected=True, text="All", value="$__all"))
    )
    return [job, instance]


def build(
    uid: str, title: str, description: str, anchor: str, default_job: str, rows: Sequence[tuple[str, Sequence[P]]]
) -> Any:
    dash = (
        gd.Dashboard(title)
        .uid(uid)
        .description(description)
        .tags(["cdm"])
        .editable()
        .time("now-6h", "now")
        .refresh("30s")
        .timezone("utc")
        .tooltip(dm.DashboardCursorSync.CROSSHAIR)
    )
    for variable in variables(anchor, default_job):
        dash = dash.with_variable(variable)
    panel_id = 0
    for row_title, panels in rows:
        panel_id += 1
        dash = dash.with_row(gd.Row(row_title).id(panel_id))
        for p in panels:
            panel_id += 1
            dash = dash.with_panel(panel(p, panel_id))
    return dash.build()


# -------------------------------------------------------------------------------------------------- overview


def overview() -> Any:
    quantile = "histogram_quantile({q}, sum by ({by}le) (rate({series}[" + RATE + "])))"
    rows: list[tuple[str, Sequence[P]]] = [
        (
            "Sources and compartments",
            [
                P("Active compartments", (Q(f"max({sel(name(D.compartments_active))})"),), kind="stat", width=4),
                P(
                    "Ready daemons",
                    (Q(f"sum({sel(name(D.ready))})"),),
                    kind="stat",
                    width=4,
                    description="Daemons whose /readyz answers 200 (cdm_ready).",
                ),
                P(
                    "Epoch: served and registry",
                    (
                        Q(sel(name(D.registry_epoch)), "served {{instance}}"),
                        Q(f"max({sel(pm.REGISTRY_LATEST_EPOCH)})", "registry"),
                    ),
                    description="The epoch each daemon serves against the registry's own (CdmDaemonEpochBehind).",
                ),
                P(
                    "Spool sources by state",
                    (Q(f"sum by (state) ({sel(name(D.spool_sources))})", "{{state}}"),),
                    description="Sources the spools hold: staged (chunks arriving), sealed (queued to train), "
                    "registered (kept for idempotence).",
                ),
                P(
                    "Oldest unsealed source",
                    (Q(f"max({sel(name(D.spool_oldest_unsealed_age))})"),),
                    unit="s",
                    kind="stat",
                    width=4,
                ),
                P("Jobs queued", (Q(sel(name(D.jobs_queued)), "{{instance}}"),), width=4),
            ],
        ),
        (
            "Training",
            [
                P(
                    "Training progress",
                    (
                        Q(
                            f"{sel(name(D.training_step))} / {sel(name(D.training_target_step))}",
                            "{{instance}} {{kind}}",
                        ),
                    ),
                    unit="percentunit",
                    description="Step / target step of the job in training, per daemon and job kind.",
                ),
                P("Training ETA", (Q(sel(name(D.training_eta)), "{{instance}} {{kind}}"),), unit="s"),
                P("Training loss", (Q(sel(name(D.training_loss)), "{{instance}}"),)),
                P(
                    "Training throughput",
                    (
                        Q(
                            f"sum by (instance, kind) (rate({sel(name(D.training_steps))}[{RATE}]))",
                            "{{instance}} {{kind}}",
                        ),
                    ),
                    unit="steps/s",
                ),
                P(
                    "Time per compartment",
                    (
                        Q(quantile.format(q=0.5, by="", series=sel(name(D.training_seconds, "_bucket"))), "p50"),
                        Q(quantile.format(q=0.9, by="", series=sel(name(D.training_seconds, "_bucket"))), "p90"),
                    ),
                    unit="s",
                ),
                P(
                    "Source path: time per stage (p90)",
                    (
                        Q(
                            quantile.format(q=0.9, by="stage, ", series=sel(name(D.source_stage_seconds, "_bucket"))),
                            "{{stage}}",
                        ),
                    ),
                    unit="s",
                    description="staged -> sealed -> training -> registered -> served: the time to reach each stage "
                    "from the previous one.",
                ),
                P(
                    "Job failures by kind",
                    (Q(f"sum by (kind) (increase({sel(name(D.job_failures))}[1h]))", "{{kind}}"),),
                    description="Worker jobs that raised in the last hour (train, retrain-router, forget-*).",
                ),
                P("Router held-out accuracy", (Q(sel(name(D.router_accuracy)), "{{instance}}"),), unit="percentunit"),
            ],
        ),
        (
            "Ingest",
            [
                P(
                    "Ingest rate",
                    (Q(f"sum by (instance) (rate({sel(name(D.messages_ingested))}[{RATE}]))", "records {{instance}}"),),
                    unit="reqps",
                ),
                P(
                    "Ingest bytes",
                    (Q(f"sum by (instance) (rate({sel(name(D.bytes_ingested))}[{RATE}]))", "{{instance}}"),),
                    unit="Bps",
                ),
                P("Consumer lag", (Q(sel(name(D.consumer_lag)), "{{instance}}"),)),
                P(
                    "Dead letters by reason",
                    (Q(f"sum by (reason) (rate({sel(name(D.dlq_messages))}[{RATE}]))", "{{reason}}"),),
                    unit="reqps",
                ),
                P(
                    "Staged bytes and spool cap",
                    (
                        Q(sel(name(D.staged_bytes)), "staged {{instance}}"),
                        Q(sel(name(D.spool_limit_bytes)), "cap {{instance}}"),
                    ),
                    unit="bytes",
                ),
            ],
        ),
        (
            "Forgetting",
            [
                P(
                    "Forget requests by kind",
                    (Q(f"sum by (kind) (rate({sel(name(D.forget_requests))}[{RATE}]))", "{{kind}}"),),
                    unit="reqps",
                ),
                P(
                    "Forget duration by kind (p90)",
                    (
                        Q(
                            quantile.format(
                                q=0.9,
                                by="kind, ",
                                series=sel(name(D.job_seconds, "_bucket"), 'kind=~"forget-source|forget-samples"'),
                            ),
                            "{{kind}}",
                        ),
                    ),
                    unit="s",
                    description="Wall time of forget-source / forget-samples jobs (deletion, retraining, router).",
                ),
            ],
        ),
        (
            "Hot swap and disks",
            [
                P(
                    "Hot swap time (p99) and failures",
                    (
                        Q(
                            quantile.format(q=0.99, by="", series=sel(name(D.hotswap_seconds, "_bucket"))),
                            "p99 seconds",
                        ),
                        Q(f"sum(rate({sel(name(D.hotswap_failures))}[{RATE}]))", "failures/s"),
                    ),
                ),
                P(
                    "Since the last successful hot swap",
                    (Q(f"time() - {sel(name(D.hotswap_last_success))}", "{{instance}}"),),
                    unit="s",
                ),
                P(
                    "Free disk by volume",
                    (Q(f"{sel(pm.VOLUME_FREE_BYTES)} / {sel(pm.VOLUME_SIZE_BYTES)}", "{{instance}} {{volume}}"),),
                    unit="percentunit",
                ),
                P("Bytes held by cdm", (Q(sel(pm.VOLUME_USED_BYTES), "{{instance}} {{volume}}"),), unit="bytes"),
            ],
        ),
    ]
    return build(
        "cdm-overview",
        "cdm / overview",
        "The daemons: sources and compartments, training, ingest, forgetting, hot swaps and disks.",
        name(D.registry_epoch),
        "cdm-daemon",
        rows,
    )


# -------------------------------------------------------------------------------------------------- serving


def serving() -> Any:
    samples = f'route="{SAMPLES_ROUTE}"'
    latency = sel(name(S.latency, "_bucket"), samples)
    swaps = sel(name(W.hotswap_seconds, "_bucket"))
    rows: list[tuple[str, Sequence[P]]] = [
        (
            "Requests",
            [
                P(
                    "Sampling requests by status",
                    (Q(f"sum by (status) (rate({sel(name(S.requests), samples)}[{RATE}]))", "{{status}}"),),
                    unit="reqps",
                ),
                P(
                    "Sampling latency",
                    tuple(
                        Q(f"histogram_quantile({q}, sum by (le) (rate({latency}[{RATE}])))", f"p{round(q * 100)}")
                        for q in (0.5, 0.9, 0.99)
                    ),
                    unit="s",
                ),
                P(
                    "Images per second",
                    (Q(f"sum by (instance) (rate({sel(name(S.images))}[{RATE}]))", "{{instance}}"),),
                    unit="short",
                ),
                P(
                    "Requests per principal",
                    (Q(f"sum by (principal) (rate({sel(name(S.principal_requests))}[{RATE}]))", "{{principal}}"),),
                    unit="reqps",
                    description="At most [serve] metrics_max_principals names; the rest are 'other', '-' = no token.",
                ),
                P("In flight", (Q(sel(name(S.in_flight)), "{{instance}}"),)),
                P(
                    "Requests by route",
                    (Q(f"sum by (route) (rate({sel(name(S.requests))}[{RATE}]))", "{{route}}"),),
                    unit="reqps",
                ),
            ],
        ),
        (
            "Service level",
            [
                P(
                    "Error ratio (5xx, 5m)",
                    (Q(sel(record("job:cdm_serve_requests:error_ratio_rate5m"), instance=False), "{{job}}"),),
                    unit="percentunit",
                    description="Objective: 99.5% of sampling requests not 5xx (CdmServeErrorBudget*).",
                ),
                P(
                    "Slower than 10 s (5m)",
                    (Q(sel(record("job:cdm_serve_request_seconds:slow_ratio_rate5m"), instance=False), "{{job}}"),),
                    unit="percentunit",
                    description="Objective: 99% of successful sampling requests within 10 s (CdmServeLatencyBudget*).",
                ),
                P(
                    "Audit append failures",
                    (Q(f"sum(rate({sel(name(S.audit_failures))}[{RATE}]))"),),
                    unit="reqps",
                ),
            ],
        ),
        (
            "Composition",
            [
                P(
                    "Served epoch per replica",
                    (
                        Q(sel(name(S.epoch)), "{{instance}}"),
                        Q(f"max({sel(pm.REGISTRY_LATEST_EPOCH)})", "registry"),
                    ),
                    description="-1: no composition loaded. CdmServeEpochBehind fires when a replica trails the "
                    "registry.",
                ),
                P("Ready replicas", (Q(f"sum({sel(pm.READY)})"),), kind="stat", width=4),
                P(
                    "Hot swap time (p99) and failures",
                    (
                        Q(f"histogram_quantile(0.99, sum by (le) (rate({swaps}[{RATE}])))", "p99 seconds"),
                        Q(f"sum(rate({sel(name(W.hotswap_failures))}[{RATE}]))", "failures/s"),
                    ),
                ),
                P(
                    "Since the last successful hot swap",
                    (Q(f"time() - {sel(name(W.hotswap_last_success))}", "{{instance}}"),),
                    unit="s",
                    width=4,
                ),
                P(
                    "Free disk (artifact cache)",
                    (Q(f"{sel(pm.VOLUME_FREE_BYTES)} / {sel(pm.VOLUME_SIZE_BYTES)}", "{{instance}} {{volume}}"),),
                    unit="percentunit",
                ),
            ],
        ),
    ]
    return build(
        "cdm-serving",
        "cdm / serving",
        "cdm serve: sampling requests, latency, images, principals, the served epoch per replica and the SLOs.",
        name(S.epoch),
        "cdm-serve",
        rows,
    )


DASHBOARDS = {"cdm-overview.json": overview, "cdm-serving.json": serving}


def render() -> dict[str, str]:
    """File name -> JSON text of every dashboard."""
    return {
        filename: json.dumps(make(), cls=JSONEncoder, indent=2, sort_keys=True) + "\n"
        for filename, make in DASHBOARDS.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a committed dashboard is out of date")
    args = parser.parse_args(argv)
    stale = []
    for filename, text in render().items():
        path = OUT / filename
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path.relative_to(ROOT)))
        else:
            path.write_text(text)
            print(f"wrote {path.relative_to(ROOT)}")
    if stale:
        print(f"out of date: {', '.join(stale)}; run `python -m deploy.observability.grafana.build`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
