"""``StatusPage``: reads what a status page shows from the registry, the served composition and the process itself.

Every part is read on its own so that one failure costs only its section: with Redis down the page still shows
what the process knows (its worker, its DLQ counters, the composition it serves, the cached grid) under an error
banner. The registry is read in a handful of pipelined round trips, bounded whatever its size (``MAX_SOURCES``,
``HISTORY_ROWS``, ``CHANGES_SCANNED``).
"""

from __future__ import annotations

import base64
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import redis

from api.ui.grids import GridCache
from api.ui.model import (
    Banner,
    CompartmentRow,
    DaemonView,
    GridView,
    HistoryRow,
    LegendEntry,
    LocalStatus,
    Page,
    Progress,
    ReceiptView,
    SourceView,
)
from cdm.lifecycle import ForgetReceipt
from cdm.viz import source_colour_hex
from common.redact import safe
from registry.acl import AccessView, allowed_sources
from registry.coordination import Coordinator
from registry.reader import RegistryClient
from registry.records import ChangeEvent, CompartmentRecord, CompartmentStatus
from sampler.live import Composition

log = logging.getLogger(__name__)

MAX_SOURCES = 200  # sources listed (the rest are counted)
VERSIONS_PER_SOURCE = 3  # newest versions shown per source
HISTORY_ROWS = 30  # change-stream entries shown
RECEIPTS_SHOWN = 10  # forget receipts shown
CHANGES_SCANNED = 2000  # newest change-stream entries read to find those (the stream is capped, not short)
DEFAULT_REFRESH_S = 10
MAX_REFRESH_S = 3600


class LiveSource(Protocol):
    """The served composition (``sampler.live.LiveComposition``)."""

    def current(self) -> Composition | None: ...

    @property
    def last_error(self) -> str | None: ...


AccessOf = Callable[[Sequence[str]], AccessView]  # the caller's access view over the given sources (serve)


def refresh_of(raw: str | None, default: int = DEFAULT_REFRESH_S) -> int:
    """The auto-refresh period from ``?refresh=N`` (0 turns it off; clamped to [2, MAX_REFRESH_S]); bad -> default."""
    if raw is None or not raw.strip().isdigit():
        return default
    value = int(raw.strip())
    return 0 if value == 0 else min(MAX_REFRESH_S, max(2, value))


class StatusPage:
    """What ``/ui`` shows, read on each view.

    Args:
        title: the page's title ("cdm daemon", "cdm serve").
        reader: registry reads (sources, versions, change stream, receipts, epoch).
        live: the composition this process serves (its epoch, sources, last hot-swap error).
        grids: the sample-grid cache; None shows no grid.
        coordinator: daemons' heartbeats (their jobs in progress); None lists no daemons.
        local: what only this process knows (readiness, its own jobs, DLQ counts, facts for the header).
        own_daemon_id: this process's daemon id, so its heartbeat does not repeat its own live progress.
        clock: wall-clock seconds (the page's time stamp).
    """

    def __init__(
        self,
        *,
        title: str,
        reader: RegistryClient,
        live: LiveSource,
        grids: GridCache | None = None,
        coordinator: Coordinator | None = None,
        local: Callable[[], LocalStatus] | None = None,
        own_daemon_id: str = "",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.title = title
        self.reader = reader
        self.live = live
        self.grids = grids
        self.coordinator = coordinator
        self.local = local
        self.own_daemon_id = own_daemon_id
        self.clock = clock

    def collect(
        self,
        *,
        refresh_s: int = DEFAULT_REFRESH_S,
        access_of: AccessOf | None = None,
        principal: str = "",
        logout: bool = False,
        list_daemons: bool = True,
    ) -> Page:
        """The page now. With ``access_of`` (serve) only the caller's sources appear: those its grants match in
        the tables, the history and the receipts; those it may sample (``AccessView.allowed``) in the grid."""
        banners: list[Banner] = []
        # 1. this process
        local = LocalStatus()
        if self.local is not None:
            try:
                local = self.local()
            except Exception as exc:  # the rest of the page is still worth showing
                log.exception("status page: the process status failed")
                banners.append(Banner("error", f"this process's status is unavailable: {safe(exc, 300)}"))
        if local.ready is False:
            banners.append(Banner("warning", "not ready: " + "; ".join(local.reasons or ("(no reason given)",))))
        banners.extend(Banner("warning", p) for p in local.problems)
        comp = self.live.current()
        hotswap_error = self.live.last_error
        if hotswap_error:
            banners.append(
                Banner("warning", f"the last hot swap failed, still serving the previous epoch: {safe(hotswap_error)}")
            )
        # 2. the registry (one failure marks every registry section unavailable)
        registry_ok, registry_epoch, routing = True, None, None
        sources: tuple[SourceView, ...] | None = None
        history: tuple[HistoryRow, ...] | None = None
        receipts: tuple[ReceiptView, ...] | None = None
        progress: tuple[Progress, ...] | None = None
        daemons: tuple[DaemonView, ...] | None = None
        hidden = 0
        grid_sources: tuple[str, ...] | None = comp.sources if comp is not None and access_of is None else None
        try:
            registry_epoch = self.reader.epoch()
            routing = self.reader.routing().value
            names = self.reader.sources()
            if access_of is not None:
                view = access_of(sorted(set(names) | set(comp.sources if comp else ())))
                names = allowed_sources(view.grants, names, view.tags)
                grid_sources = tuple(view.allowed(comp.sources)) if comp is not None else None
            visible = set(names)
            hidden = max(0, len(names) - MAX_SOURCES)
            shown = _by_interest(names, comp)[:MAX_SOURCES]
            versions = self.reader.latest_versions(shown, VERSIONS_PER_SOURCE)
            sources = tuple(_source_view(name, versions.get(name, []), comp) for name in shown)
            recent = self.reader.recent_changes(CHANGES_SCANNED)
            changes = [c for c in recent if c.source is None or c.source in visible]
            history = tuple(_history_row(c) for c in changes[:HISTORY_ROWS])
            request_ids = [str(c.detail.get("request_id", "")) for c in changes if c.kind == "forgotten"]
            receipts = tuple(
                _receipt_view(ForgetReceipt.from_dict(doc))
                for doc in self.reader.receipts([r for r in request_ids if r][:RECEIPTS_SHOWN])
            )
            heartbeats = self.coordinator.live_daemons() if self.coordinator is not None else []
            if list_daemons and self.coordinator is not None:
                daemons = tuple(_daemon_view(d.daemon_id, d.info, d.ttl_s) for d in heartbeats)
            others = [
                Progress.of(d.daemon_id, d.info)
                for d in heartbeats
                if d.daemon_id != self.own_daemon_id and d.info.get("job") not in (None, "", "idle")
            ]
            if access_of is not None:  # another principal's source in training is not the caller's business
                others = [p for p in others if not p.source or p.source in visible]  # router jobs concern all
            progress = (*local.progress, *others)
        except redis.RedisError as exc:
            registry_ok = False
            log.warning("status page: registry unreachable: %s", exc)
            banners.insert(
                0,
                Banner(
                    "error",
                    f"the registry (Redis) is unreachable: {safe(exc, 300)}. Showing what this process knows; "
                    "the registry's sections are unavailable until it is back.",
                ),
            )
            progress = local.progress if access_of is None else None
        # 3. the grid (never drawn here: queued, shown once ready)
        grid = self._grid(comp, grid_sources)
        return Page(
            title=self.title,
            generated_at=self.clock(),
            refresh_s=refresh_s,
            banners=tuple(banners),
            registry_ok=registry_ok,
            served_epoch=comp.epoch if comp is not None else None,
            registry_epoch=registry_epoch,
            routing=routing,
            local=local,
            grid=grid,
            sources=sources,
            sources_hidden=hidden,
            history=history,
            receipts=receipts,
            progress=progress,
            daemons=daemons,
            daemons_listed=list_daemons and self.coordinator is not None,
            principal=principal,
            logout=logout,
        )

    def _grid(self, comp: Composition | None, sources: tuple[str, ...] | None) -> GridView:
        if self.grids is None:
            return GridView("none", "sample grids are off on this page")
        if comp is None:
            return GridView("none", "no composition is served yet, so there is nothing to sample")
        if sources is None:
            return GridView("none", "the sources you may see cannot be read while the registry is unreachable")
        if not sources:
            return GridView("none", "none of the served sources is available to you")
        spec = self.grids.spec
        grid = self.grids.get(comp, sources)
        if grid.state == "drawing":
            return GridView(
                "drawing", f"drawing the grid of epoch {comp.epoch}; it appears on a later refresh", comp.epoch
            )
        if grid.state == "failed":
            return GridView("failed", f"drawing the grid of epoch {comp.epoch} failed: {grid.error}", comp.epoch)
        legend = tuple(
            LegendEntry(name, source_colour_hex(name), share)
            for name, share in zip(grid.sources, grid.attribution or (0.0,) * len(grid.sources), strict=True)
        )
        return GridView(
            "ready",
            epoch=grid.epoch,
            data_uri="data:image/png;base64," + base64.b64encode(grid.png).decode(),
            legend=legend,
            n=spec.n,
            steps=spec.steps,
        )


# ---------------------------------------------------------------------------------------------- helpers


def _by_interest(names: Sequence[str], comp: Composition | None) -> list[str]:
    """Served sources first (in composition order), then the others by name."""
    served = list(comp.sources) if comp is not None else []
    wanted, served_set = set(names), set(served)
    return [s for s in served if s in wanted] + sorted(s for s in names if s not in served_set)


def _source_view(name: str, records: Sequence[CompartmentRecord], comp: Composition | None) -> SourceView:
    served = set(comp.compartment_ids) if comp is not None else set()
    pending = set(comp.pending) if comp is not None else set()
    rows = tuple(_row(r, r.compartment_id in served, r.compartment_id in pending) for r in records)
    if not rows:
        state = "unknown"
    elif any(r.state == "active" for r in rows):
        state = "active"
    elif rows[0].state == "training":
        state = "training"
    elif rows[0].note.startswith("forgotten"):
        state = "forgotten"
    else:
        state = "retired"
    if state == "active" and any(r.state == "training" for r in rows):
        state = "active, training"
    return SourceView(name, source_colour_hex(name), state, rows)


def _row(r: CompartmentRecord, served: bool, pending: bool) -> CompartmentRow:
    metrics: dict[str, Any] = dict(r.train_metrics)
    note = r.retired_reason
    if pending and r.status is CompartmentStatus.ACTIVE:
        note = "active, waits for the next router"
    return CompartmentRow(
        compartment_id=r.compartment_id,
        version=r.version,
        state=r.status.value,
        n_samples=r.n_samples,
        created_at=r.created_at,
        updated_at=r.updated_at,
        final_loss=_number(metrics.get("final_loss")),
        train_seconds=_number(metrics.get("seconds")),
        note=note,
        served=served,
    )


def _history_row(c: ChangeEvent) -> HistoryRow:
    shown = {k: v for k, v in sorted(c.detail.items()) if v not in (None, "", [], {})}
    if "receipt_id" in shown:  # the receipts section has the rest; its first 12 characters find it there
        shown["receipt_id"] = str(shown["receipt_id"])[:12]
    detail = ", ".join(f"{k.replace('_', ' ')}: {_short(v)}" for k, v in shown.items())
    return HistoryRow(
        epoch=c.epoch,
        kind=c.kind,
        at=c.at,
        source=c.source,
        colour=source_colour_hex(c.source) if c.source else None,
        compartment_id=c.compartment_id,
        detail=safe(detail, 200),
    )


def _receipt_view(r: ForgetReceipt) -> ReceiptView:
    return ReceiptView(
        receipt_id=r.request_id,
        source=r.source,
        colour=source_colour_hex(r.source),
        compartment_ids=tuple(r.retired),
        epoch=r.epoch if r.epoch is not None else -1,
        reason=safe(r.detail, 200),
        created_at=r.completed_at,
    )


def _daemon_view(daemon_id: str, info: dict[str, Any], ttl_s: float) -> DaemonView:
    return DaemonView(
        daemon_id=daemon_id,
        host=str(info.get("host", "")),
        version=str(info.get("version", "")),
        job=str(info.get("job", "") or "idle"),
        source=str(info.get("source", "") or ""),
        expires_in_s=ttl_s,
    )


def _short(value: Any) -> str:
    if isinstance(value, list | tuple):
        return " ".join(str(v) for v in value)
    return str(value)


def _number(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None
