"""``create_app``: the ``cdm serve`` ASGI app, built from the clients it receives (tests build one per case).

The app holds no global state and starts nothing: the caller owns the live composition (its watcher thread), the
Redis client behind the registry reader and the access registry, and the metrics registry. ``lifespan`` lets the
caller start and stop them with the server (``cdm serve`` does).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import anyio.to_thread
import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, make_asgi_app
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from api.auth import Authenticator
from api.config import ServeConfig
from api.errors import ApiError
from api.metrics import ReadinessPoll, ServeMetrics
from api.middleware import ObserveRequests
from api.routes import LiveSource, ServeContext, build_router, readiness, validation_message
from api.ui import GridCache, LocalStatus, StatusPage
from api.ui.serve import build_ui_router
from cdm.config import SampleConfig
from cdm.errors import CdmError
from registry.acl import ServeLedger
from registry.coordination import Coordinator
from registry.reader import RegistryClient
from sampler.batching import BatchingSampler, Iteration
from sampler.engine import PerRequestSampler, Sampler
from sampler.errors import SamplerUnavailable

log = logging.getLogger(__name__)
Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[None]]

DESCRIPTION = """\
Samples from the Compartmentalized Diffusion Model the registry serves now: one compartment per data source,
composed at sampling time as eps = sum_i w_i(x_t, t, c) eps_i(x_t, t, c) over **the sources you may use**.
Authenticate with `Authorization: Bearer <token>` (`cdm token create PRINCIPAL`). Every response that used the
composition carries its registry epoch in `X-CDM-Epoch`. See docs/http-api.md.
"""


class _Asgi:
    """Wraps an ASGI callable so Starlette's ``Route`` treats it as an app, not as a request handler."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": code, "message": message}, status_code=status, headers=headers)


def _with_poll(inner: Lifespan | None, poll: ReadinessPoll) -> Lifespan:
    """``inner`` (the caller's lifespan), with the readiness poll running inside it (after it started)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with inner(app) if inner is not None else contextlib.nullcontext():
            poll.start()
            try:
                yield
            finally:
                poll.stop()

    return lifespan


def default_sampler(settings: ServeConfig, metrics: ServeMetrics | None = None) -> Sampler:
    """The sampler ``[serve]`` asks for: ``BatchingSampler`` (``batching = true``) or ``PerRequestSampler``."""
    if not settings.batching:
        return PerRequestSampler(threads=settings.sampling_threads)

    def observe(it: Iteration) -> None:
        if metrics is not None:
            metrics.observe_iteration(it.rows, len(it.requests))

    return BatchingSampler(
        max_batch_rows=settings.max_batch_rows,
        max_wait_s=settings.max_wait_ms / 1000,
        timeout_s=settings.sample_timeout_s,
        on_iteration=observe,
    )


def create_app(
    settings: ServeConfig,
    *,
    live: LiveSource,
    auth: Authenticator,
    registry_reader: RegistryClient,
    metrics_registry: CollectorRegistry,
    clock: Callable[[], float] = time.time,
    ledger: ServeLedger | None = None,
    sampler: Sampler | None = None,
    sample_defaults: SampleConfig | None = None,
    lifespan: Lifespan | None = None,
    grids: GridCache | None = None,
) -> FastAPI:
    """The ``cdm serve`` app.

    Args:
        settings: ``[serve]``.
        live: the served composition (``sampler.live.LiveComposition``; the caller starts its watcher).
        auth: tokens and access views (``api.auth.Authenticator``).
        registry_reader: registry reads (the epoch for /readyz, compartment records for /v1/sources).
        metrics_registry: where the app's metrics are registered; /metrics exposes it.
        clock: wall-clock seconds (audit timestamps, readiness lag).
        ledger: concurrency slots and the audit stream; default: on the access registry's Redis client.
        sampler: the compute behind the routes; default ``default_sampler(settings)``: the cross-request batcher,
            or ``PerRequestSampler`` with ``[serve] batching = false`` (a default one is closed with the app).
        sample_defaults: ``[sample]`` (default scheduler, steps, mode).
        lifespan: started with the server and stopped after it (``cdm serve`` starts the registry watcher here).
        grids: the status page's sample grids (``/ui``); None shows the page without a grid.
    """
    metrics = ServeMetrics(
        metrics_registry,
        max_principals=settings.metrics_max_principals,
        served_epoch=lambda: comp.epoch if (comp := live.current()) is not None else None,
    )
    if ledger is None:
        ledger = ServeLedger(auth.access.client, auth.access.keys, audit_maxlen=settings.audit_maxlen)
    ctx = ServeContext(
        settings=settings,
        sample_defaults=sample_defaults or SampleConfig(),
        live=live,
        auth=auth,
        ledger=ledger,
        reader=registry_reader,
        sampler=sampler or default_sampler(settings, metrics),
        metrics=metrics,
        clock=clock,
    )

    def probe() -> tuple[bool, int | None]:
        ready, body = readiness(ctx)
        return ready, body.registry_epoch

    poll = ReadinessPoll(probe, metrics, interval_s=settings.resync_s)
    owned = ctx.sampler if sampler is None else None

    @asynccontextmanager
    async def lifespan_with_sampler(app: FastAPI) -> AsyncIterator[None]:
        try:
            if lifespan is None:
                yield
            else:
                async with lifespan(app):
                    yield
        finally:
            # the default sampler stops with the app (the batching engine thread; queued requests get 503)
            close = getattr(owned, "close", None)
            if close is not None:
                await anyio.to_thread.run_sync(close)

    app = FastAPI(
        title="cdm serve",
        version="1",
        description=DESCRIPTION,
        lifespan=_with_poll(lifespan_with_sampler, poll),
    )
    app.include_router(build_router(ctx))

    def local() -> LocalStatus:
        ready, body = readiness(ctx)
        return LocalStatus(ready=ready, reasons=() if ready else (body.reason,))

    page = StatusPage(
        title="cdm serve",
        reader=registry_reader,
        live=live,
        grids=grids,
        coordinator=Coordinator(auth.access.client, auth.access.keys),  # daemons' heartbeats: training progress
        local=local,
        clock=clock,
    )
    app.include_router(build_ui_router(page, auth))
    app.router.routes.append(Route("/metrics", _Asgi(make_asgi_app(metrics_registry)), include_in_schema=False))

    # every error is {"error", "message"}
    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, "invalid_request", validation_message(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:  # FastAPI's body decoding (not UTF-8, not JSON): a bad parameter like any other
            return _error(422, "invalid_request", f"the request body cannot be parsed ({exc.detail}); send UTF-8 JSON")
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error(exc.status_code, code, str(exc.detail), dict(exc.headers or {}))

    @app.exception_handler(SamplerUnavailable)
    async def sampler_unavailable(_: Request, exc: SamplerUnavailable) -> JSONResponse:
        return _error(503, "unavailable", str(exc), {"Retry-After": str(exc.retry_after_s)})

    @app.exception_handler(CdmError)
    async def library_error(_: Request, exc: CdmError) -> JSONResponse:
        return _error(422, "invalid_request", str(exc))

    @app.exception_handler(redis.RedisError)
    async def registry_down(request: Request, exc: redis.RedisError) -> JSONResponse:
        log.error("registry error on %s: %s", request.url.path, exc)
        return _error(503, "unavailable", "the registry (Redis) is unreachable; retry shortly", {"Retry-After": "2"})

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        request_id = getattr(request.state, "request_id", "")
        log.exception("internal error on %s (request %s)", request.url.path, request_id)
        return _error(500, "internal_error", f"internal error; quote request id {request_id} to the operators")

    # outside the exception handlers, so it sees every final status
    app.add_middleware(ObserveRequests, metrics=metrics, audit=ledger.append, clock=clock)
    return app
