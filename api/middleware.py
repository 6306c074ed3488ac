"""One pure-ASGI middleware around the app: a request id, the epoch header, metrics, and the audit stream.

It sees the final status of every request (including errors raised by handlers), so the metrics and the audit
entry are written once per request, after the response started. Handlers leave what the audit needs in
``request.state`` (``principal``, ``token_id``, ``sources``, ``requested``, ``epoch``, ``n``).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import anyio.to_thread
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.metrics import ServeMetrics

log = logging.getLogger(__name__)
API_PREFIX = "/v1/"
UNMATCHED = "unmatched"


class ObserveRequests:
    """Adds ``X-Request-ID`` (and ``X-CDM-Epoch`` when a handler set ``state.epoch``), observes metrics and
    appends one audit entry per API request (``/v1/...``).

    Args:
        app: the wrapped ASGI app.
        metrics: where requests are counted.
        audit: appends one entry (a blocking call; run in a worker thread); None = no audit.
        clock: wall-clock seconds for the entry's ``at``.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        metrics: ServeMetrics,
        audit: Callable[[Mapping[str, str | int | float]], Any] | None,
        clock: Callable[[], float],
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.audit = audit
        self.clock = clock

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex
        state: dict[str, Any] = scope.setdefault("state", {})
        state["request_id"] = request_id
        status = 500
        started = time.perf_counter()

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers = MutableHeaders(scope=message)
                headers["X-Request-ID"] = request_id
                if state.get("epoch") is not None:
                    headers["X-CDM-Epoch"] = str(state["epoch"])
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            self.metrics.in_flight.dec()
            seconds = time.perf_counter() - started
            route = getattr(scope.get("route"), "path", None) or UNMATCHED
            path: str = scope.get("path", "")
            is_api = path.startswith(API_PREFIX)
            self.metrics.observe(
                route=route,
                method=scope.get("method", ""),
                status=status,
                seconds=seconds,
                principal=str(state.get("principal", "")) if is_api else None,
            )
            if is_api and self.audit is not None:
                await self._append_audit(state, route, scope.get("method", ""), status, seconds)

    async def _append_audit(
        self, state: Mapping[str, Any], route: str, method: str, status: int, seconds: float
    ) -> None:
        entry: dict[str, str | int | float] = {
            "at": self.clock(),
            "request_id": str(state.get("request_id", "")),
            "principal": str(state.get("principal", "")),
            "token_id": str(state.get("token_id", "")),
            "route": route,
            "method": method,
            "status": status,
            "sources": ",".join(state.get("sources", ())),
            "requested": ",".join(state.get("requested", ())),
            "epoch": state["epoch"] if state.get("epoch") is not None else "",
            "n": int(state.get("n", 0)),
            "seconds": round(seconds, 6),
        }
        try:
            await anyio.to_thread.run_sync(self.audit, entry)  # type: ignore[arg-type]
        except Exception as exc:  # the response is already sent: count and log, never fail it afterwards
            self.metrics.audit_failures.inc()
            log.error("audit append failed for request %s: %s", entry["request_id"], exc)
