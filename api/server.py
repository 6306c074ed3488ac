"""Run an ASGI app with uvicorn in a background thread, with bounded resources and a clean stop.

uvicorn serves every connection from one asyncio event loop (one thread, whatever the number of clients), and
keeps idle keep-alive connections for ``timeout_keep_alive`` only. It has no timeout for a request that is being
received, though: a client that opens a connection and sends half a request line holds that connection for
ever, and with ``limit_concurrency`` such connections even make uvicorn answer 503 to everybody else. So
``GuardedH11Protocol`` (uvicorn's h11 protocol plus two rules) adds:

* **read timeout**: a request (line, headers and body) must arrive within ``read_timeout_s`` of its first byte
  (of the connection's opening, for the first request); otherwise the server answers ``408`` and closes.
* **connection cap**: at most ``max_connections`` open connections. At the cap, a new connection evicts the
  oldest connection that has not sent a whole request (a half-sent request or an idle keep-alive connection);
  when every connection is busy with a complete request, the new one is answered ``503`` and closed. Slow or
  idle clients therefore never lock out a prompt one, and requests being answered are never cut.

Also bounded: the request head (``max_header_bytes``, h11's incomplete-event limit: 431/400 past it), the listen
backlog, keep-alive idling, and shutdown (``stop()`` asks uvicorn to exit, waits ``shutdown_timeout_s`` for
in-flight requests, then cancels them and joins the thread).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from typing import Any, cast

import h11
import uvicorn
from starlette.types import ASGIApp
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)

_RECEIVING = (h11.IDLE, h11.SEND_BODY)  # their_state while a request has not been received whole
_408 = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
_503 = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


class GuardedConfig(uvicorn.Config):
    """uvicorn's Config plus the guard's two settings (read by ``GuardedH11Protocol``)."""

    def __init__(self, app: ASGIApp, *, read_timeout_s: float, max_connections: int, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.read_timeout_s = read_timeout_s
        self.max_connections = max_connections


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a request read timeout and a connection cap that evicts the slowest."""

    def __init__(self, config: uvicorn.Config, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        guarded = cast(GuardedConfig, config)
        self.read_timeout_s = guarded.read_timeout_s
        self.max_connections = guarded.max_connections
        self.opened_at = 0.0
        self._read_timer: asyncio.TimerHandle | None = None

    # -- uvicorn's protocol interface
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        self.opened_at = time.monotonic()
        self._arm()
        if not self._make_room():
            self._reject(_503)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.transport.is_closing():
            return
        if self.conn.their_state in _RECEIVING:
            if self._read_timer is None:
                self._arm()  # a new request on a kept-alive connection: its first byte starts the clock
        else:
            self._disarm()  # received whole: the app's time to answer is not limited here

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    # -- the rules
    @property
    def receiving(self) -> bool:
        """Open and not holding a whole request (half-sent, or idle between keep-alive requests)."""
        busy = self.cycle is not None and not self.cycle.response_complete
        return not self.transport.is_closing() and self.conn.their_state in _RECEIVING and not busy

    def _arm(self) -> None:
        self._disarm()
        self._read_timer = self.loop.call_later(self.read_timeout_s, self._on_read_timeout)

    def _disarm(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _on_read_timeout(self) -> None:
        self._read_timer = None
        if not self.transport.is_closing() and self.conn.their_state in _RECEIVING:
            log.debug("closing %s: no whole request within %.1fs", self.client, self.read_timeout_s)
            self._reject(_408 if self.cycle is None or self.cycle.response_complete else b"")

    def _make_room(self) -> bool:
        """Keep at most ``max_connections`` open: evict the oldest receiving one; False if all are busy."""
        live = [c for c in self.connections if not c.transport.is_closing()]
        if len(live) <= self.max_connections:
            return True
        waiting = [c for c in live if isinstance(c, GuardedH11Protocol) and c is not self and c.receiving]
        if not waiting:
            return False
        victim = min(waiting, key=lambda c: c.opened_at)
        log.debug(
            "connection cap %d reached: evicting %s (waiting since %.1fs)",
            self.max_connections,
            victim.client,
            time.monotonic() - victim.opened_at,
        )
        victim._reject(_408)
        return True

    def _reject(self, response: bytes) -> None:
        self._disarm()
        if response and self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE) and not self.transport.is_closing():
            self.transport.write(response)
        self.transport.close()


class AppServer:
    """An ASGI app served by uvicorn from a daemon thread.

    Args:
        app: the ASGI application.
        host: interface to bind ("0.0.0.0" in a container).
        port: TCP port; 0 picks a free one (read ``port`` after ``start()``).
        read_timeout_s: a request not received whole within this is answered 408 and closed.
        max_connections: open connections at most (see the module docstring for who is evicted).
        backlog: the listen queue (connections the kernel holds before they are accepted).
        keep_alive_s: an idle keep-alive connection is closed after this.
        max_header_bytes: largest request head.
        shutdown_timeout_s: how long ``stop()`` lets in-flight requests finish.
        name: the thread's name.
    """

    def __init__(
        self,
        app: ASGIApp,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        read_timeout_s: float = 10.0,
        max_connections: int = 256,
        backlog: int = 128,
        keep_alive_s: int = 5,
        max_header_bytes: int = 16 * 1024,
        shutdown_timeout_s: float = 2.0,
        name: str = "cdm-http",
    ) -> None:
        self.app = app
        self.host = host
        self.requested_port = port
        self.read_timeout_s = read_timeout_s
        self.max_connections = max_connections
        self.backlog = backlog
        self.keep_alive_s = keep_alive_s
        self.max_header_bytes = max_header_bytes
        self.shutdown_timeout_s = shutdown_timeout_s
        self.name = name
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._port: int | None = None

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        if self._port is None:
            raise RuntimeError("AppServer is not started")
        return self._port

    @property
    def url(self) -> str:
        host = self.host if self.host not in ("", "0.0.0.0", "::") else "127.0.0.1"
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}"

    @property
    def server(self) -> uvicorn.Server:
        """The running uvicorn server (its ``server_state`` counts connections and tasks)."""
        if self._server is None:
            raise RuntimeError("AppServer is not started")
        return self._server

    def start(self, timeout_s: float = 10.0) -> None:
        """Bind (OSError if the port is taken), then serve from a daemon thread; returns once it accepts."""
        if self._server is not None:
            return
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.create_server((self.host, self.requested_port), family=family, backlog=self.backlog)
        config = GuardedConfig(
            self.app,
            read_timeout_s=self.read_timeout_s,
            max_connections=self.max_connections,
            http=GuardedH11Protocol,
            ws="none",
            loop="asyncio",
            lifespan="auto",
            backlog=self.backlog,
            timeout_keep_alive=self.keep_alive_s,
            timeout_graceful_shutdown=max(1, round(self.shutdown_timeout_s)),
            h11_max_incomplete_event_size=self.max_header_bytes,
            log_config=None,
            log_level="warning",
            access_log=False,
            server_header=False,
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=self.name, daemon=True)
        self._server, self._thread, self._port = server, thread, sock.getsockname()[1]
        thread.start()
        deadline = time.monotonic() + timeout_s
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                sock.close()
                raise RuntimeError(f"the HTTP server on {self.host}:{self.requested_port} did not start")
            time.sleep(0.01)
        log.info("serving HTTP on %s", self.url)

    def stop(self) -> None:
        """Stop accepting, let in-flight requests finish (up to shutdown_timeout_s), join the thread. Idempotent."""
        server, thread = self._server, self._thread
        self._server, self._thread, self._port = None, None, None
        if server is None or thread is None:
            return
        server.should_exit = True
        thread.join(self.shutdown_timeout_s + 5)
        if thread.is_alive():
            server.force_exit = True
            thread.join(5)
        if thread.is_alive():
            log.error("the HTTP server thread %s did not stop", self.name)

    def __enter__(self) -> AppServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
