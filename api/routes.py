"""The ``/v1`` routes of ``cdm serve``: a thin layer over access control (api/auth.py) and the sampler seam
(sampler/engine.py). Every route reads the served composition once, so one request is answered from one epoch.

Access: a request is composed only from the caller's allowed sources (intersected with ``sources`` when given);
the others are never evaluated and never appear as attribution columns. A source the caller may not see is
treated exactly like one that does not exist: the same status and body, and the same work (the access view reads
every served source's tags whatever was asked).

No ``from __future__ import annotations`` here: FastAPI reads the route signatures at run time, and they refer to
names local to ``build_router`` (the bearer scheme, the ``Caller`` dependency).
"""

import base64
import binascii
import io
import json
import secrets
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any, Protocol

import anyio
import anyio.to_thread
import numpy as np
from fastapi import APIRouter, Depends, Request, Security
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from PIL import Image, UnidentifiedImageError
from pydantic import ValidationError
from starlette.requests import Request as StarletteRequest

from api.auth import Authenticator, Principal
from api.config import ServeConfig
from api.errors import ApiError, forbidden, invalid, limited, unavailable
from api.metrics import ServeMetrics
from api.schemas import (
    MAX_SEED,
    AttributeBody,
    AttributeParams,
    AttributeResponse,
    EpochResponse,
    ErrorResponse,
    HealthResponse,
    ReadyResponse,
    SampleBody,
    SampleResponse,
    SourceInfo,
    SourcesResponse,
    TimestepPosterior,
)
from cdm.config import SampleConfig
from cdm.viz import grid_png, image_png
from registry.acl import ServeLedger
from registry.reader import RegistryClient
from sampler.engine import AttributeRequest, Sampler, SampleRequest, SampleResult
from sampler.live import Composition

MAX_IMAGE_PIXELS = 4096 * 4096  # larger uploads are refused before they are decoded
ATTRIBUTION_METHODS = {  # cdm/image_attribution.py: "router" for the learnt and heads kinds, "elbo" for density
    "router": (
        "x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps for each timestep t and noise draw eps; per t the arithmetic "
        "mean over the draws of the router's P(source | x_t, t, label) renormalised over the sources considered; "
        "posterior = the mean of those over the timesteps"
    ),
    "elbo": (
        "x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps for each timestep t and noise draw eps (the same draws for "
        "every source, in pairs eps, -eps); log p_i(image | label) = "
        "-sum_t W_t mean_eps |eps - eps_i(x_t, t, label)|^2 + const, each source's diffusion ELBO "
        "(W_t = beta_t / (2 alpha_t (1 - abar_t)) times the width of t's "
        "quadrature cell); posterior = softmax over the sources considered of log prior_i + log p_i; per t the "
        "posterior from that timestep's term alone"
    ),
}


class LiveSource(Protocol):
    """The served composition (``sampler.live.LiveComposition``)."""

    def current(self) -> Composition | None: ...

    @property
    def last_error(self) -> str | None: ...


@dataclass
class ServeContext:
    """Everything the routes use, passed in by ``create_app``."""

    settings: ServeConfig
    sample_defaults: SampleConfig
    live: LiveSource
    auth: Authenticator
    ledger: ServeLedger
    reader: RegistryClient
    sampler: Sampler
    metrics: ServeMetrics
    clock: Callable[[], float]
    _lag_since: float | None = field(default=None, init=False)

    def composition(self) -> Composition:
        comp = self.live.current()
        if comp is None:
            raise unavailable(
                "no composition is served yet (the registry has no active compartment with a router, or it is "
                "still loading); retry shortly",
                retry_after_s=5,
            )
        return comp


ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "missing, malformed, unknown or revoked bearer token"},
    403: {"model": ErrorResponse, "description": "none of the sources asked for (or none at all) is available to you"},
    422: {"model": ErrorResponse, "description": "invalid parameters; the message names them"},
    429: {"model": ErrorResponse, "description": "beyond your limits on n, steps, draws or concurrent requests"},
    503: {"model": ErrorResponse, "description": "no composition served yet, or the registry is unreachable"},
}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {c: ERRORS[c] for c in codes}


def build_router(ctx: ServeContext) -> APIRouter:
    """The API routes (``/v1/...``, ``/healthz``, ``/readyz``) over ``ctx``."""
    router = APIRouter()
    bearer = HTTPBearer(auto_error=False, description="a token from `cdm token create PRINCIPAL`")
    s = ctx.settings

    def caller(request: Request, _: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]) -> Principal:
        """The request's principal (401 unless the token is valid or anonymous access is on)."""
        principal = ctx.auth.authenticate(request.headers.get("authorization"))
        request.state.principal = principal.name
        request.state.token_id = principal.token_id
        return principal

    Caller = Annotated[Principal, Depends(caller)]

    async def allowed(
        request: Request, principal: Principal, comp: Composition, requested: Sequence[str] | None
    ) -> tuple[str, ...]:
        """The sources this request is composed from: the caller's, intersected with ``requested``; else 403."""
        view = await anyio.to_thread.run_sync(ctx.auth.view, principal, comp.sources)
        mine = view.allowed(comp.sources)
        if requested is not None:
            wanted = set(requested)
            mine = [src for src in mine if src in wanted]
        used = tuple(mine)
        request.state.sources = used
        if used:
            return used
        if requested is not None:
            raise forbidden(
                "none of the sources you asked for is available to you; GET /v1/sources lists those you may use"
            )
        raise forbidden(
            f"no source is available to principal {principal.name!r}; an operator grants access with `cdm acl grant`"
        )

    @asynccontextmanager
    async def slot(principal: Principal, request: Request) -> AsyncIterator[None]:
        """One of the principal's ``max_concurrent`` request slots (shared by every replica), or 429."""
        request_id = str(request.state.request_id)
        taken = await anyio.to_thread.run_sync(
            lambda: ctx.ledger.acquire(
                principal.name, request_id, limit=s.max_concurrent, lease_ms=int(s.request_lease_s * 1000)
            )
        )
        if not taken:
            raise limited(
                f"principal {principal.name!r} already has {s.max_concurrent} request(s) running, the most it may "
                "have at once ([serve] max_concurrent); retry when one has finished",
                retry_after_s=1,
            )
        try:
            yield
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(ctx.ledger.release, principal.name, request_id)

    def check_labels(comp: Composition, labels: Sequence[int] | None) -> None:
        if labels is None:
            return
        k = comp.denoiser.num_classes
        if k == 0:
            raise invalid("the served compartments are unconditional (their sources had no labels); drop the labels")
        bad = [c for c in labels if c >= k]
        if bad:
            raise invalid(f"class label {bad[0]} is out of range; labels must be in [0, {k})")

    # ------------------------------------------------------------------------------------------ /v1/samples

    @router.post(
        "/v1/samples",
        summary="Sample images from the composition of your sources",
        response_model=SampleResponse,
        responses={
            200: {
                "description": "images, attribution over the sources used, and the epoch served (also X-CDM-Epoch)",
                "content": {
                    "image/png": {"schema": {"type": "string", "format": "binary"}},
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                },
            },
            **_errors(401, 403, 422, 429, 503),
        },
    )
    async def samples(body: SampleBody, request: Request, principal: Caller) -> Response:
        # 1. the caller's limits
        st = request.state
        st.n = body.n
        st.requested = tuple(body.sources or ())
        steps = body.steps or ctx.sample_defaults.num_inference_steps
        if body.n > s.max_n:
            raise limited(
                f"n = {body.n} is more than the {s.max_n} images one request may ask for ([serve] max_n); "
                "split it into several requests"
            )
        if steps > s.max_steps:
            raise limited(f"steps = {steps} is more than the {s.max_steps} denoising steps allowed ([serve] max_steps)")
        # 2. one composition for the whole request, and the sources it may use
        comp = ctx.composition()
        st.epoch = comp.epoch
        used = await allowed(request, principal, comp, body.sources)
        check_labels(comp, body.labels)
        sd = ctx.sample_defaults
        req = SampleRequest(
            composition=comp,
            sources=used,
            n=body.n,
            steps=steps,
            scheduler=body.scheduler or sd.scheduler,
            seed=body.seed if body.seed is not None else secrets.randbelow(MAX_SEED + 1),
            labels=tuple(body.labels) if body.labels is not None else None,
            top_k=body.top_k if body.top_k is not None else (sd.top_k if sd.mode == "top_k" else None),
            guidance_scale=body.guidance_scale if body.guidance_scale is not None else sd.guidance_scale,
        )
        # 3. sample within one of the caller's concurrency slots
        async with slot(principal, request):
            result = await ctx.sampler.sample(req)
        ctx.metrics.images.inc(len(result.images))
        return await anyio.to_thread.run_sync(_render, req, result, body.format)

    # ------------------------------------------------------------------------------------------ /v1/sources, /v1/epoch

    @router.get(
        "/v1/sources",
        summary="The sources you may use in the served composition",
        response_model=SourcesResponse,
        responses=_errors(401, 503),
    )
    async def sources(request: Request, principal: Caller) -> SourcesResponse:
        comp = ctx.composition()
        request.state.epoch = comp.epoch
        view = await anyio.to_thread.run_sync(ctx.auth.view, principal, comp.sources)
        mine = set(view.allowed(comp.sources))
        ids = [cid for cid, src in zip(comp.compartment_ids, comp.sources, strict=True) if src in mine]
        records = {r.compartment_id: r for r in await anyio.to_thread.run_sync(ctx.reader.get_many, ids)}
        request.state.sources = tuple(src for src in comp.sources if src in mine)
        return SourcesResponse(
            epoch=comp.epoch,
            sources=[
                SourceInfo(
                    name=src,
                    tags=dict(view.tags.get(src, {})),
                    n_samples=records[cid].n_samples if cid in records else 0,
                    compartment_id=cid,
                    epoch=comp.epoch,
                )
                for cid, src in zip(comp.compartment_ids, comp.sources, strict=True)
                if src in mine
            ],
        )

    @router.get(
        "/v1/epoch",
        summary="The registry epoch of the served composition",
        response_model=EpochResponse,
        responses=_errors(401, 503),
    )
    async def epoch(request: Request, principal: Caller) -> EpochResponse:
        comp = ctx.composition()
        request.state.epoch = comp.epoch
        return EpochResponse(epoch=comp.epoch, loaded_at=comp.loaded_at)

    # ------------------------------------------------------------------------------------------ /v1/attribute

    attribute_schema = AttributeBody.model_json_schema()
    form_schema = {
        "type": "object",
        "required": ["image"],
        "properties": {
            "image": {"type": "string", "format": "binary", "description": "the image (PNG)"},
            "sources": {"type": "string", "description": "comma-separated source names"},
            "label": {"type": "integer", "minimum": 0},
            "timesteps": {"type": "string", "description": "comma-separated timesteps"},
            "draws": {"type": "integer", "minimum": 1},
            "seed": {"type": "integer", "minimum": 0},
        },
    }

    @router.post(
        "/v1/attribute",
        summary="Which of your sources does an image look like (the router's posterior, or the compartments' ELBOs)",
        response_model=AttributeResponse,
        responses={
            **_errors(401, 403, 422, 429, 503),
            413: {"model": ErrorResponse, "description": "the image is larger than [serve] max_upload_bytes"},
            415: {"model": ErrorResponse, "description": "send application/json or multipart/form-data"},
        },
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": attribute_schema},
                    "multipart/form-data": {"schema": form_schema},
                },
            }
        },
    )
    async def attribute(request: Request, principal: Caller) -> AttributeResponse:
        # 1. the body: JSON with a base64 PNG, or a multipart upload; bounded before it is decoded
        params, png = await _read_attribute_body(request, s.max_upload_bytes)
        st = request.state
        st.n = 1
        st.requested = tuple(params.sources or ())
        draws = params.draws if params.draws is not None else s.attribute_draws
        if draws > s.max_attribute_draws:
            raise limited(
                f"draws = {draws} is more than the {s.max_attribute_draws} noise draws allowed "
                "([serve] max_attribute_draws)"
            )
        image = await anyio.to_thread.run_sync(_decode_png, png)
        # 2. the composition, the caller's sources, then the posterior over them (router or ELBOs, by routing kind)
        comp = ctx.composition()
        st.epoch = comp.epoch
        used = await allowed(request, principal, comp, params.sources)
        labels = (params.label,) if params.label is not None else None
        check_labels(comp, labels)
        seed = params.seed if params.seed is not None else 0
        req = AttributeRequest(
            composition=comp,
            sources=used,
            images=image[None],
            timesteps=tuple(params.timesteps if params.timesteps is not None else s.attribute_timesteps),
            draws=draws,
            seed=seed,
            labels=labels,
        )
        async with slot(principal, request):
            res = await ctx.sampler.attribute(req)
        post = [float(v) for v in res.posterior[0]]
        return AttributeResponse(
            epoch=comp.epoch,
            sources=list(res.sources),
            posterior=post,
            top_source=res.sources[int(np.argmax(post))],
            by_timestep=[
                TimestepPosterior(t=t, posterior=[float(v) for v in res.by_timestep[i, 0]])
                for i, t in enumerate(res.timesteps)
            ],
            draws=res.draws,
            seed=seed,
            method=res.method,
            method_description=ATTRIBUTION_METHODS[res.method],
        )

    # ------------------------------------------------------------------------------------------ probes

    @router.get("/healthz", summary="The process is up", response_model=HealthResponse)
    async def healthz() -> HealthResponse:
        return HealthResponse(status="ok")

    @router.get(
        "/readyz",
        summary="Ready only when a composition is loaded and current",
        response_model=ReadyResponse,
        responses={503: {"model": ReadyResponse, "description": "not ready; reason says why"}},
    )
    def readyz() -> JSONResponse:
        ready, body = readiness(ctx)
        return JSONResponse(body.model_dump(), status_code=200 if ready else 503)

    return router


def readiness(ctx: ServeContext) -> tuple[bool, ReadyResponse]:
    """Ready when a composition is loaded, its last swap did not fail, and it has the registry's epoch (or trails
    it for less than ``[serve] ready_max_lag_s``, the time a hot swap may take)."""
    comp = ctx.live.current()
    served = comp.epoch if comp is not None else None
    try:
        registry_epoch: int | None = ctx.reader.epoch()
    except Exception as exc:  # any registry failure means not ready; the reason says which
        return False, ReadyResponse(
            status="not ready", reason=f"registry unreachable: {exc}", epoch=served, registry_epoch=None
        )

    def answer(ok: bool, reason: str) -> tuple[bool, ReadyResponse]:
        return ok, ReadyResponse(
            status="ready" if ok else "not ready", reason=reason, epoch=served, registry_epoch=registry_epoch
        )

    if comp is None:
        return answer(False, "no composition loaded (nothing servable in the registry yet, or still loading)")
    if ctx.live.last_error:
        return answer(False, f"the last hot swap failed, still serving epoch {served}: {ctx.live.last_error}")
    if served == registry_epoch:
        ctx._lag_since = None
        return answer(True, f"serving epoch {served}")
    now = ctx.clock()
    if ctx._lag_since is None:
        ctx._lag_since = now
    lag = now - ctx._lag_since
    if lag > ctx.settings.ready_max_lag_s:
        return answer(False, f"serving epoch {served} but the registry is at {registry_epoch} for {lag:.0f}s")
    return answer(True, f"serving epoch {served}; loading epoch {registry_epoch} ({lag:.0f}s)")


# ---------------------------------------------------------------------------------------------- helpers


def _render(req: SampleRequest, result: SampleResult, fmt: str) -> Response:
    """The response body in ``fmt``; the same headers for every format."""
    headers = {"X-CDM-Sources": ",".join(result.sources), "X-CDM-Seed": str(req.seed)}
    if fmt == "png":
        att = [[round(float(v), 4) for v in row] for row in result.attribution]
        headers["X-CDM-Attribution"] = json.dumps(att, separators=(",", ":"))
        body = grid_png(result.images, attribution=result.attribution, source_names=list(result.sources))
        return Response(body, media_type="image/png", headers=headers)
    if fmt == "npz":
        buf = io.BytesIO()
        np.savez(
            buf,
            images=result.images,
            attribution=result.attribution.astype(np.float32),
            sources=np.array(result.sources),
            epoch=np.int64(result.epoch),
            seed=np.int64(req.seed),
        )
        headers["Content-Disposition"] = f'attachment; filename="samples-epoch{result.epoch}.npz"'
        return Response(buf.getvalue(), media_type="application/octet-stream", headers=headers)
    doc = SampleResponse(
        epoch=result.epoch,
        sources=list(result.sources),
        n=len(result.images),
        seed=req.seed,
        steps=req.steps,
        scheduler=req.scheduler,  # type: ignore[arg-type]
        top_k=req.top_k,
        guidance_scale=req.guidance_scale,
        image_shape=[int(v) for v in result.images.shape[1:]],
        images=[base64.b64encode(image_png(img)).decode() for img in result.images],
        attribution=[[float(v) for v in row] for row in result.attribution],
    )
    return Response(doc.model_dump_json(), media_type="application/json", headers=headers)


async def _read_limited(request: Request, limit: int) -> bytes:
    """The request body, or 413 as soon as it passes ``limit`` bytes (Content-Length is checked first)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "too_large", f"the body is {declared} bytes; at most {limit} are accepted")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "too_large", f"the body is larger than the {limit} bytes accepted")
        chunks.append(chunk)
    return b"".join(chunks)


async def _read_attribute_body(request: Request, max_image: int) -> tuple[AttributeParams, bytes]:
    """(options, PNG bytes) from a JSON body (``image`` base64) or a multipart form (``image`` file)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json":
        raw = await _read_limited(request, max_image * 4 // 3 + 64 * 1024)
        try:
            body = AttributeBody.model_validate_json(raw)
        except ValidationError as exc:
            raise invalid(validation_message(exc.errors())) from None
        try:
            png = base64.b64decode(body.image, validate=True)
        except (binascii.Error, ValueError):
            raise invalid("image: not valid base64; send the PNG file's bytes base64-encoded") from None
        params = AttributeParams.model_validate(body.model_dump(exclude={"image"}))
    elif ctype == "multipart/form-data":
        raw = await _read_limited(request, max_image + 64 * 1024)

        async def replay() -> dict[str, Any]:
            return {"type": "http.request", "body": raw, "more_body": False}

        try:
            form = await StarletteRequest(request.scope, replay).form(
                max_files=1, max_fields=16, max_part_size=max_image
            )
        except Exception as exc:  # multipart parse errors have several types across versions
            raise invalid(f"the multipart body cannot be parsed: {exc}") from None
        try:
            upload = form.get("image")
            if upload is None or isinstance(upload, str):
                raise invalid("image: missing; upload the PNG as a file field named 'image' (curl -F image=@x.png)")
            png = await upload.read()
            fields: dict[str, Any] = {}
            for name in ("sources", "timesteps"):
                value = form.get(name)
                if isinstance(value, str) and value.strip():
                    fields[name] = [v.strip() for v in value.split(",") if v.strip()]
            for name in ("label", "draws", "seed"):
                value = form.get(name)
                if isinstance(value, str) and value.strip():
                    fields[name] = value.strip()
            unknown = sorted(set(form.keys()) - {"image", "sources", "timesteps", "label", "draws", "seed"})
        finally:
            await form.close()  # spooled upload files
        if unknown:
            raise invalid(f"unknown form field(s) {unknown}; allowed: image, sources, label, timesteps, draws, seed")
        try:
            params = AttributeParams.model_validate(fields)
        except ValidationError as exc:
            raise invalid(validation_message(exc.errors())) from None
    else:
        raise ApiError(
            415,
            "unsupported_media_type",
            f"Content-Type {ctype or '(none)'!r} is not accepted; send application/json with a base64 'image' "
            "or multipart/form-data with an 'image' file",
        )
    if len(png) > max_image:
        raise ApiError(413, "too_large", f"the image is {len(png)} bytes; at most {max_image} are accepted")
    return params, png


def _decode_png(raw: bytes) -> np.ndarray:
    """uint8 (H, W, C) from PNG bytes; 422 for anything else, 413 for huge dimensions (checked before decoding)."""
    try:
        with Image.open(io.BytesIO(raw), formats=["PNG"]) as im:
            w, h = im.size
            if w * h > MAX_IMAGE_PIXELS:
                raise ApiError(413, "too_large", f"the image is {w}x{h} pixels; at most {MAX_IMAGE_PIXELS} are allowed")
            grey = im.mode in ("1", "L", "LA", "I", "I;16", "F")
            arr = np.asarray(im.convert("L" if grey else "RGB"), dtype=np.uint8)
    except ApiError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ApiError(413, "too_large", f"the image has more than {MAX_IMAGE_PIXELS} pixels") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise invalid(f"image: not a readable PNG ({type(exc).__name__}); send a PNG file") from None
    return arr[..., None] if arr.ndim == 2 else arr


def validation_message(errors: Sequence[Any]) -> str:
    """One line per pydantic error: ``field.path: message (got value)``."""
    parts = []
    for err in errors[:10]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path", "header"))
        got = err.get("input")
        shown = "" if isinstance(got, dict) or got is None else f" (got {json.dumps(got, default=str)[:80]})"
        parts.append(f"{loc or 'body'}: {err.get('msg', 'invalid')}{shown}")
    more = f"; and {len(errors) - 10} more" if len(errors) > 10 else ""
    return "; ".join(parts) + more
