"""A small threaded HTTP server for ``/metrics``, ``/healthz`` and ``/readyz`` (stdlib only).

* ``/metrics``: Prometheus text exposition of the given ``CollectorRegistry``.
* ``/healthz``: liveness. 200 while ``is_alive()`` is true (the poll loop's heartbeat is fresh), else 503.
  A failing liveness probe makes the orchestrator restart the process.
* ``/readyz``: readiness. 200 when ``is_ready()`` says so (Redis reachable and a composition loaded), else 503;
  the JSON body says why, e.g. ``{"ready": false, "reasons": ["no composition loaded"], "epoch": 0}``.
  ``is_ready`` returns a ``Readiness`` or a ``(ready, message)`` tuple.
* ``/status``: the JSON of an optional ``status()`` callable (what the daemon is doing), 404 without one.

The probes are called on the request thread: keep them cheap (read state the daemon maintains).
A probe that raises answers 503 with the error instead of failing the request.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Readiness:
    """What ``is_ready()`` returns."""

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


class HealthServer:
    """Serves /metrics, /healthz, /readyz (and /status) on ``host:port`` from a daemon thread.

    Args:
        host: interface to bind ("0.0.0.0" in a container).
        port: TCP port; 0 picks a free one (read ``port`` after ``start()``).
        registry: the metrics to expose.
        is_alive: liveness probe (true while the main loop makes progress).
        is_ready: readiness probe, returning ``Readiness`` or ``(ready, message)``.
        status: optional JSON-able description of the daemon's state for ``/status``.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        registry: CollectorRegistry,
        is_alive: Callable[[], bool],
        is_ready: ReadyProbe,
        status: Callable[[], Mapping[str, Any]] | None = None,
    ) -> None:
        self.registry = registry
        self.is_alive = is_alive
        self.is_ready = is_ready
        self.status = status
        self._address = (host, port)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        if self._server is None:
            raise RuntimeError("HealthServer is not started")
        port: int = self._server.server_address[1]
        return port

    @property
    def url(self) -> str:
        host = self._address[0] if self._address[0] not in ("", "0.0.0.0", "::") else "127.0.0.1"
        return f"http://{host}:{self.port}"

    def start(self) -> None:
        """Bind and serve in a daemon thread. OSError if the port is taken."""
        if self._server is not None:
            return
        server = _Server(self._address, _Handler)
        server.app = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.1}, name="cdm-health", daemon=True
        )
        self._thread.start()
        log.info("health endpoint on %s (/metrics /healthz /readyz)", self.url)

    def stop(self) -> None:
        """Stop serving and release the port (idempotent)."""
        server, thread = self._server, self._thread
        self._server, self._thread = None, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def __enter__(self) -> HealthServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    app: HealthServer


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        app = self.server.app
        if path == "/metrics":
            self._send(200, generate_latest(app.registry), CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            try:
                alive, body = bool(app.is_alive()), {}
            except Exception as exc:  # a broken probe means "not alive", never a 500
                alive, body = False, {"error": f"{type(exc).__name__}: {exc}"}
            self._json(200 if alive else 503, {"alive": alive, **body})
        elif path == "/readyz":
            try:
                readiness = Readiness.of(app.is_ready())
            except Exception as exc:
                readiness = Readiness(False, (f"readiness check failed: {type(exc).__name__}: {exc}",))
            self._json(200 if readiness.ready else 503, readiness.to_json())
        elif path == "/status" and app.status is not None:
            try:
                self._json(200, app.status())
            except Exception as exc:
                self._json(500, {"error": f"{type(exc).__name__}: {exc}"})
        else:
            self._json(404, {"error": f"no such endpoint {path!r}; try /metrics, /healthz, /readyz or /status"})

    def _json(self, code: int, body: Mapping[str, Any]) -> None:
        self._send(code, json.dumps(body, default=str).encode(), "application/json")

    def _send(self, code: int, payload: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s - %s", self.address_string(), format % args)
