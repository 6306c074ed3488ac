"""What a status page shows: plain frozen dataclasses, filled by ``api.ui.collect`` and rendered by the templates.

A section that could not be read is ``None`` (the template says why, from the page's banners); an empty tuple
means "read, and there is nothing".
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class Progress:
    """One job in progress on one daemon (its own worker status, or another daemon's heartbeat)."""

    daemon_id: str
    job: str  # "train", "retrain-router", "forget-source", "forget-samples"
    source: str = ""  # "" for jobs over every source (router)
    step: int = 0
    steps: int = 0  # 0 while the job has not reported a step
    loss: float | None = None
    eta_s: float | None = None  # seconds left at the rate since the job's first step; None until known

    @property
    def fraction(self) -> float | None:
        """step / steps in [0, 1]; None before the first step."""
        return min(1.0, max(0.0, self.step / self.steps)) if self.steps > 0 else None

    @classmethod
    def of(cls, daemon_id: str, info: Mapping[str, object]) -> Progress:
        """From a daemon's heartbeat info (``daemon.service.Service._heartbeat_info``)."""
        return cls(
            daemon_id=daemon_id,
            job=str(info.get("job", "") or ""),
            source=str(info.get("source", "") or ""),
            step=_int(info.get("step")),
            steps=_int(info.get("steps")),
            loss=_finite(info.get("loss")),
            eta_s=_finite(info.get("eta_s")),
        )


@dataclass(frozen=True)
class LocalStatus:
    """What only the process serving the page knows; the daemon passes its worker, DLQ counters and readiness.

    ``dlq`` None hides the dead-letter section (``cdm serve`` consumes no Kafka).
    """

    ready: bool | None = None  # None: not reported
    reasons: tuple[str, ...] = ()  # why not ready
    problems: tuple[str, ...] = ()  # shown as warning banners (a failed hot swap, the worker's last error)
    progress: tuple[Progress, ...] = ()  # jobs of this process
    queued_jobs: int | None = None
    dlq: Mapping[str, float] | None = None  # dead-lettered records by reason, since this process started
    facts: Mapping[str, str] = field(default_factory=dict)  # shown in the header: daemon id, version, ...


State = Literal["training", "active", "retired"]


@dataclass(frozen=True)
class CompartmentRow:
    """One version of one source."""

    compartment_id: str
    version: int
    state: State
    n_samples: int
    created_at: float  # training began (unix s)
    updated_at: float  # activated, or retired, or last changed
    final_loss: float | None
    train_seconds: float | None
    note: str  # why it was retired; "pending router" when active but not yet routed
    served: bool  # in the composition this process serves now


@dataclass(frozen=True)
class SourceView:
    """A source and its newest versions (newest first)."""

    name: str
    colour: str  # CSS #rrggbb, from the name (cdm.viz.source_colour)
    state: str  # the newest version's state; "forgotten" when every version was retired by a forget
    rows: tuple[CompartmentRow, ...]


@dataclass(frozen=True)
class HistoryRow:
    """One entry of the registry's change stream."""

    epoch: int
    kind: str  # "training", "activated", "retired", "forgotten", "router", "routing"
    at: float
    source: str | None
    colour: str | None
    compartment_id: str | None
    detail: str


@dataclass(frozen=True)
class ReceiptView:
    """A forget receipt."""

    receipt_id: str
    source: str
    colour: str
    compartment_ids: tuple[str, ...]
    epoch: int
    reason: str
    created_at: float


@dataclass(frozen=True)
class DaemonView:
    """A live daemon (its heartbeat)."""

    daemon_id: str
    host: str
    version: str
    job: str
    source: str
    expires_in_s: float


@dataclass(frozen=True)
class LegendEntry:
    name: str
    colour: str
    share: float  # mean attribution of the grid's images to this source, in [0, 1]


GridState = Literal["ready", "drawing", "failed", "none"]


@dataclass(frozen=True)
class GridView:
    """The sample grid of the served composition (drawn in the background, cached per epoch and sources)."""

    state: GridState
    message: str = ""
    epoch: int | None = None
    data_uri: str = ""  # data:image/png;base64,... when ready
    legend: tuple[LegendEntry, ...] = ()
    n: int = 0
    steps: int = 0


@dataclass(frozen=True)
class Banner:
    level: Literal["error", "warning", "info"]
    text: str


@dataclass(frozen=True)
class Page:
    """One status page."""

    title: str  # "cdm daemon" / "cdm serve"
    generated_at: float
    refresh_s: int  # 0 = no auto-refresh
    banners: tuple[Banner, ...]
    registry_ok: bool
    served_epoch: int | None
    registry_epoch: int | None
    routing: str | None
    local: LocalStatus
    grid: GridView
    sources: tuple[SourceView, ...] | None
    sources_hidden: int  # sources beyond the page's cap
    history: tuple[HistoryRow, ...] | None
    receipts: tuple[ReceiptView, ...] | None
    progress: tuple[Progress, ...] | None
    daemons: tuple[DaemonView, ...] | None  # None when unreadable
    daemons_listed: bool = False  # the page has a daemons section (the daemon's, not serve's)
    principal: str = ""  # the caller (serve)
    logout: bool = False  # the caller came in with the login cookie: offer to log out

    @property
    def dlq_total(self) -> float:
        return sum(self.local.dlq.values()) if self.local.dlq else 0.0


def _int(value: object) -> int:
    try:
        return int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return 0


def _finite(value: object) -> float | None:
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None
