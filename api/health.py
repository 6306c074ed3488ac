"""The daemon's HTTP surface as an ASGI app: ``/metrics``, ``/healthz``, ``/readyz`` and ``/status`` (Starlette).

* ``/metrics``: Prometheus text exposition of the given ``CollectorRegistry`` (``prometheus_client.make_asgi_app``).
* ``/healthz``: liveness. 200 ``{"alive": true}`` while ``is_alive()`` is true, else 503. A failing liveness probe
  makes the orchestrator restart the process.
* ``/readyz``: readiness. 200 when ``readiness()`` says so, else 503; the JSON body says why, e.g.
  ``{"ready": false, "reasons": ["no composition loaded"], "epoch": 0}``. ``readiness`` returns a ``Readiness``
  or a ``(ready, message)`` tuple.
* ``/status``: the JSON of an optional ``status()`` callable (what the daemon is doing), 404 without one.
* ``/ui``: the status page (HTML, ``api.ui``) of an optional ``StatusPage``, 404 without one; ``?refresh=N`` sets
  its auto-refresh (0: off). Always 200 while the process runs: a registry that cannot be read is a banner on the
  page, next to what the daemon knows by itself.

The probes run on the server's event loop: they must only read state (the daemon computes readiness in the
background and the probe reads that cache; see ``daemon.readiness``). A probe that raises answers 503 (500 for
``/status``) with its error, redacted and bounded, instead of failing the request.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, make_asgi_app
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from api.ui import StatusPage, refresh_of, status_page
from common.redact import safe

ENDPOINTS = ("/metrics", "/healthz", "/readyz", "/status", "/ui")


@dataclass(frozen=True)
class Readiness:
    """What a readiness probe returns."""

    ready: bool
    reasons: tuple[str, ...] = ()  # why not ready (empty when ready)
    details: Mapping[str, Any] = field(default_factory=dict)  # extra JSON fields, e.g. {"epoch": 3}

    def to_json(self) -> dict[str, Any]:
        return {**self.details, "ready": self.ready, "reasons": list(self.reasons)}

    @classmethod
    def of(cls, value: Readiness | tuple[bool, str]) -> Readiness:
        """Normalise what a probe returned; a ``(ready, message)`` tuple puts the message in the body."""
        if isinstance(value, Readiness):
            return value
        ready, message = value
        return cls(bool(ready), () if ready else (message,), {"detail": message} if ready else {})


ReadyProbe = Callable[[], Readiness | tuple[bool, str]]


class JSONResponse(Response):
    """JSON with ``Cache-Control: no-store`` (probes must never be answered from a cache)."""

    media_type = "application/json"

    def __init__(self, content: Any, status_code: int = 200) -> None:
        super().__init__(json.dumps(content, default=str).encode(), status_code, headers={"Cache-Control": "no-store"})


class _ASGIEndpoint:
    """An ASGI app as a Route endpoint at an exact path (a function endpoint would be taken for a view)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


@dataclass
class HealthProbes:
    """The callables behind the endpoints (mutable, so tests can swap one on a running app)."""

    is_alive: Callable[[], bool]
    readiness: ReadyProbe
    status: Callable[[], Mapping[str, Any]] | None = None


def create_health_app(
    registry: CollectorRegistry,
    is_alive: Callable[[], bool],
    readiness: ReadyProbe,
    status: Callable[[], Mapping[str, Any]] | None = None,
    ui: StatusPage | None = None,
) -> Starlette:
    """The daemon's health app.

    Args:
        registry: the metrics served at /metrics.
        is_alive: liveness probe (true while the main loop makes progress); must not block.
        readiness: readiness probe returning ``Readiness`` or ``(ready, message)``; must not block (read a cache).
        status: optional JSON-able description of the daemon's state for /status.
        ui: optional status page for /ui (every source; this port is for operators, like /status).

    ``app.state.probes`` holds the probes (a ``HealthProbes``).
    """
    probes = HealthProbes(is_alive, readiness, status)

    async def healthz(request: Request) -> Response:
        try:
            alive, body = bool(probes.is_alive()), {}
        except Exception as exc:  # a broken probe means "not alive", never a 500
            alive, body = False, {"error": safe(f"{type(exc).__name__}: {exc}")}
        return JSONResponse({"alive": alive, **body}, 200 if alive else 503)

    async def readyz(request: Request) -> Response:
        try:
            ready = Readiness.of(probes.readiness())
        except Exception as exc:
            ready = Readiness(False, (safe(f"readiness check failed: {type(exc).__name__}: {exc}"),))
        return JSONResponse(ready.to_json(), 200 if ready.ready else 503)

    async def status_endpoint(request: Request) -> Response:
        if probes.status is None:
            return not_found(request)
        try:
            return JSONResponse(dict(probes.status()))
        except Exception as exc:
            return JSONResponse({"error": safe(f"{type(exc).__name__}: {exc}")}, 500)

    def ui_endpoint(request: Request) -> Response:  # sync: Starlette runs it in a worker thread (it reads Redis)
        if ui is None:
            return not_found(request)
        return status_page(ui.collect(refresh_s=refresh_of(request.query_params.get("refresh"))))

    def not_found(request: Request, exc: Exception | None = None) -> Response:
        path = safe(request.url.path, 200)
        return JSONResponse({"error": f"no such endpoint {path!r}; try {', '.join(ENDPOINTS)}"}, 404)

    app = Starlette(
        routes=[
            Route("/healthz", healthz, methods=["GET", "HEAD"]),
            Route("/readyz", readyz, methods=["GET", "HEAD"]),
            Route("/status", status_endpoint, methods=["GET", "HEAD"]),
            Route("/ui", ui_endpoint, methods=["GET", "HEAD"]),
            Route("/metrics", _ASGIEndpoint(make_asgi_app(registry))),
        ],
        exception_handlers={404: not_found},
    )
    app.state.probes = probes
    return app
