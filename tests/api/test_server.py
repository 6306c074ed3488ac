"""api/server.py: slow and half-sent clients cannot exhaust the server (read timeout, connection cap, no threads).

Real sockets against a real uvicorn on an ephemeral port. The flood is 300 connections that each send part of a
request line and then nothing, kept open (a slowloris client); the stdlib server this replaced spent one thread on
each of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from api.health import create_health_app
from api.server import AppServer

FLOOD = 300
_503 = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


def os_threads() -> int:
    """Threads of this process as the kernel counts them (Python's and any native ones)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads: line in /proc/self/status")


def health_app() -> Starlette:
    return create_health_app(CollectorRegistry(), lambda: True, lambda: (True, "serving"))


def get(port: int, path: str = "/healthz", timeout: float = 5.0) -> tuple[int, float]:
    """(status, seconds) of one GET on a fresh connection."""
    started = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        status = conn.getresponse().status
    finally:
        conn.close()
    return status, time.monotonic() - started


@contextlib.contextmanager
def half_sent(port: int, n: int, payload: bytes = b"GET /healthz HTT") -> Iterator[list[socket.socket]]:
    """``n`` connections that each sent ``payload`` (part of a request line) and nothing more, kept open."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            if payload:
                sock.sendall(payload)
            socks.append(sock)
        yield socks
    finally:
        for sock in socks:
            sock.close()


def wait_for(check: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


def open_connections(srv: AppServer) -> int:
    return sum(1 for c in srv.server.server_state.connections if not c.transport.is_closing())  # type: ignore[attr-defined]


RESET = b"<reset>"


def closed_by_server(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """What the server sent before closing ``sock``, or RESET when it closed with request bytes still unread
    (the kernel then resets the connection); raises TimeoutError if it stays open past ``timeout``."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except ConnectionResetError:
        return RESET
    return data


def test_half_sent_requests_neither_block_healthz_nor_grow_threads() -> None:
    with AppServer(health_app(), read_timeout_s=30, max_connections=1024) as srv:
        assert get(srv.port)[0] == 200
        threads_py, threads_os = threading.active_count(), os_threads()
        with half_sent(srv.port, FLOOD):
            wait_for(lambda: open_connections(srv) >= FLOOD)
            statuses = [get(srv.port) for _ in range(20)]
            assert all(code == 200 for code, _ in statuses)
            assert max(seconds for _, seconds in statuses) < 1.0, statuses  # prompt, not queued behind the flood
            assert (threading.active_count(), os_threads()) == (threads_py, threads_os)  # one loop serves them all
        assert get(srv.port)[0] == 200


def test_the_read_timeout_closes_half_sent_and_silent_connections() -> None:
    with AppServer(health_app(), read_timeout_s=0.5, max_connections=1024) as srv:
        with half_sent(srv.port, 20) as partial, half_sent(srv.port, 5, b"") as silent:
            started = time.monotonic()
            for sock in partial:
                assert closed_by_server(sock).startswith(b"HTTP/1.1 408 ")
            for sock in silent:
                closed_by_server(sock)
            assert time.monotonic() - started < 4.0
            wait_for(lambda: open_connections(srv) == 0)
        # a kept-alive connection whose second request stalls half-way is closed the same way
        sock = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = b""
        while not reply.endswith(b'{"alive": true}'):
            reply += sock.recv(4096)
        assert reply.startswith(b"HTTP/1.1 200 ")
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHo")
        assert closed_by_server(sock).startswith(b"HTTP/1.1 408 ")
        sock.close()
        # a request line that dribbles in byte by byte does not reset the clock
        sock = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        started = time.monotonic()
        with pytest.raises(OSError):
            for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\n" * 10:
                sock.sendall(bytes([byte]))
                time.sleep(0.05)
        assert time.monotonic() - started < 3.0
        sock.close()


def test_at_the_cap_the_oldest_waiting_connection_is_evicted_and_healthz_still_answers() -> None:
    cap = 16
    srv = AppServer(health_app(), read_timeout_s=60, max_connections=cap)
    with srv, half_sent(srv.port, FLOOD) as socks:
        wait_for(lambda: open_connections(srv) <= cap)
        code, seconds = get(srv.port)
        assert code == 200 and seconds < 1.0
        assert open_connections(srv) <= cap
        assert closed_by_server(socks[0]).startswith((b"HTTP/1.1 408 ", RESET))  # the oldest went first
        socks[-1].settimeout(0.2)
        with pytest.raises(TimeoutError):  # the newest is still waiting for its read timeout
            socks[-1].recv(1)


def test_requests_being_answered_are_never_evicted() -> None:
    release = threading.Event()

    async def slow(request: Request) -> PlainTextResponse:
        while not release.is_set():
            await asyncio.sleep(0.01)
        return PlainTextResponse("done")

    app = Starlette(routes=[Route("/slow", slow)])
    with AppServer(app, read_timeout_s=60, max_connections=8) as srv:
        busy = [http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10) for _ in range(8)]
        for conn in busy:
            conn.request("GET", "/slow")
        wait_for(lambda: len(srv.server.server_state.tasks) == 8)
        with half_sent(srv.port, 4) as socks:
            for sock in socks:  # no room: every open connection is busy, so newcomers are refused
                assert closed_by_server(sock) in (_503, RESET)
            assert len(srv.server.server_state.tasks) == 8
        release.set()
        assert [conn.getresponse().read() for conn in busy] == [b"done"] * 8
        for conn in busy:
            conn.close()


def test_an_oversized_request_head_is_refused() -> None:
    """A head still incomplete past max_header_bytes is refused (not buffered until the read timeout)."""
    with AppServer(health_app(), max_header_bytes=4096, read_timeout_s=60) as srv:
        sock = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 10_000)
        reply = closed_by_server(sock)
        assert reply.startswith((b"HTTP/1.1 400 ", b"HTTP/1.1 431 ")), reply[:60]
        sock.close()


def test_stop_is_clean_with_a_flood_open() -> None:
    srv = AppServer(health_app(), read_timeout_s=60)
    srv.start()
    port, threads = srv.port, threading.active_count()
    with half_sent(port, 100):
        started = time.monotonic()
        srv.stop()
        assert time.monotonic() - started < 5.0
    assert threading.active_count() == threads - 1  # the server thread joined
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))  # the port is free again
