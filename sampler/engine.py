"""The seam between the HTTP API and the compute: ``Sampler`` takes one request, already access-checked, and its
composition; ``PerRequestSampler`` runs each request on its own (one pipeline call in a worker thread).

The cross-request batcher (sampler/batching.py, ``BatchingSampler``, the default of ``cdm serve``) implements the same
protocol: it receives requests whose ``sources`` differ per request and coalesces their rows, evaluating each
compartment only on the rows allowed to use it. The routes never change: they build a ``SampleRequest`` and await
``sampler.sample(request)``. A sampler that cannot answer now (queue timeout, shutting down) raises
``sampler.errors.SamplerUnavailable`` (HTTP 503).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import anyio
import anyio.to_thread
import numpy as np
import torch

from cdm.image_attribution import ImageAttribution, attribute_images
from cdm.pipeline import CompartmentalPipeline, make_scheduler
from sampler.live import Composition


@dataclass(frozen=True)
class SampleRequest:
    """One request to sample, after access control: ``sources`` is what this caller may use and asked for."""

    composition: Composition  # the composition current when the request was admitted (its epoch is served)
    sources: tuple[str, ...]  # non-empty subset of composition.sources, in composition order
    n: int
    steps: int
    scheduler: str  # "ddpm", "ddim" or "dpm"
    seed: int
    labels: tuple[int, ...] | None = None  # cycled over the n samples; None = unconditional
    top_k: int | None = None  # route each sample to its k most likely sources; None = the full mixture
    guidance_scale: float = 1.0  # classifier-free guidance s (cdm/guidance.py); 1 = none, ignored without labels


@dataclass(frozen=True)
class SampleResult:
    """Images and their attribution; the columns of ``attribution`` are exactly ``sources``."""

    epoch: int
    sources: tuple[str, ...]
    images: np.ndarray  # uint8 (N, H, W, C)
    attribution: np.ndarray  # (N, K) mean router weight over the trajectory
    seconds: float


@dataclass(frozen=True)
class AttributeRequest:
    """One image batch to attribute, after access control."""

    composition: Composition
    sources: tuple[str, ...]  # non-empty subset of composition.sources
    images: np.ndarray  # uint8 (N, H, W[, C])
    timesteps: tuple[int, ...]
    draws: int
    seed: int
    labels: tuple[int, ...] | None = None


class Sampler(Protocol):
    """What the routes call. Implementations: ``PerRequestSampler``, ``sampler.batching.BatchingSampler``."""

    async def sample(self, request: SampleRequest) -> SampleResult: ...

    async def attribute(self, request: AttributeRequest) -> ImageAttribution: ...


def sample_now(request: SampleRequest) -> SampleResult:
    """Sample one request in the calling thread: only ``request.sources``' compartments are evaluated."""
    started = time.perf_counter()
    comp = request.composition
    pipe = CompartmentalPipeline(comp.denoiser, make_scheduler(request.scheduler, comp.model_config))
    out = pipe(
        batch_size=request.n,
        class_labels=list(request.labels) if request.labels is not None else None,
        sources=list(request.sources),
        top_k=request.top_k,
        num_inference_steps=request.steps,
        generator=torch.Generator().manual_seed(request.seed),
        progress=False,
        guidance_scale=request.guidance_scale,
    )
    cols = [out.source_names.index(s) for s in request.sources]  # the pipeline may return zero columns for others
    return SampleResult(
        epoch=comp.epoch,
        sources=request.sources,
        images=out.images,
        attribution=np.ascontiguousarray(out.attribution[:, cols], dtype=np.float64),
        seconds=time.perf_counter() - started,
    )


def attribute_now(request: AttributeRequest) -> ImageAttribution:
    """Attribute one request in the calling thread: the learnt and heads kinds run the router only, the density kind
    the compartments of ``request.sources`` only (their ELBOs; ``cdm.image_attribution``)."""
    return attribute_images(
        request.composition.denoiser,
        request.images,
        sources=list(request.sources),
        timesteps=request.timesteps,
        draws=request.draws,
        class_labels=list(request.labels) if request.labels is not None else None,
        seed=request.seed,
    )


class PerRequestSampler:
    """Each request on its own, in a worker thread, at most ``threads`` at once (the rest wait their turn).

    Args:
        threads: requests computed at once in this process.
        observe: called with the seconds each sampling request took (e.g. a histogram's ``observe``).
    """

    def __init__(self, *, threads: int = 1, observe: Callable[[float], None] | None = None) -> None:
        if threads < 1:
            raise ValueError(f"threads = {threads} must be >= 1")
        self._limiter = anyio.CapacityLimiter(threads)
        self._observe = observe

    async def sample(self, request: SampleRequest) -> SampleResult:
        result = await anyio.to_thread.run_sync(sample_now, request, limiter=self._limiter)
        if self._observe is not None:
            self._observe(result.seconds)
        return result

    async def attribute(self, request: AttributeRequest) -> ImageAttribution:
        return await anyio.to_thread.run_sync(attribute_now, request, limiter=self._limiter)
