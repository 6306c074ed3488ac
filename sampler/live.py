"""Hot swap: follow the registry and replace the served composition atomically, never serving a broken one.

On every new epoch the watcher thread asks a builder (``sampler.loader.CompositionLoader``) for the new
composition: compartments are immutable and cached by id, every sha256 is verified against the registry, and a
new ComposedDenoiser is built. Then one reference is swapped. Requests that already hold the old composition
finish on it. When loading fails, the last good composition keeps serving and the error is reported
(``last_error``, logs, metrics).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from prometheus_client import Counter, Gauge, Histogram

from cdm.compose import Composed
from cdm.config import ModelConfig, SampleConfig
from cdm.errors import CdmError
from cdm.pipeline import CompartmentalPipeline, CompartmentalPipelineOutput, make_scheduler
from registry.reader import RegistryClient
from registry.records import RegistrySnapshot

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Composition:
    """What one epoch of the registry serves."""

    epoch: int
    denoiser: Composed  # ComposedDenoiser (learnt routing) or DensityComposition (density routing)
    compartment_ids: tuple[str, ...]
    sources: tuple[str, ...]  # column names of attribution (one per compartment)
    pending: tuple[str, ...] = ()  # active compartments the router does not cover yet (served after retraining)
    loaded_at: float = field(default_factory=time.time)

    @property
    def model_config(self) -> ModelConfig:
        return self.denoiser.model_config


class CompositionBuilder(Protocol):
    """Builds the composition of a registry snapshot (``sampler.loader.CompositionLoader``)."""

    def build(self, snap: RegistrySnapshot) -> Composition | None: ...


class SwapMetrics(Protocol):
    """The metrics a live composition reports (``daemon.metrics.Metrics`` has them)."""

    hotswap_seconds: Histogram
    hotswap_failures: Counter
    registry_epoch: Gauge
    sampling_seconds: Histogram


class LiveComposition:
    """The served composition, following the registry in a background thread.

    Args:
        client: registry read client (its Redis connection is the caller's).
        loader: builds compositions (device, vectorisation, artifact cache).
        sample: sampling defaults.
        metrics: optional hot-swap seconds and failures, epoch, sampling seconds.
        resync_s: re-read the epoch at least this often even without a pub/sub event.
    """

    def __init__(
        self,
        client: RegistryClient,
        loader: CompositionBuilder,
        *,
        sample: SampleConfig | None = None,
        metrics: SwapMetrics | None = None,
        resync_s: float = 5.0,
        on_swap: Callable[[Composition | None], None] | None = None,
    ) -> None:
        self._client = client
        self._loader = loader
        self._sample = sample or SampleConfig()
        self._metrics = metrics
        self._resync_s = resync_s
        self._on_swap = on_swap
        self._current: Composition | None = None
        self._seen_epoch: int | None = None
        self._lock = threading.Lock()  # serialises loads, never held by readers
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_error: str | None = None
        self.swaps = 0

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="cdm-hotswap", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        self._client.watch(self.apply, self._stop, resync_s=self._resync_s)

    # -- swapping ---------------------------------------------------------------------------------
    def current(self) -> Composition | None:
        """The composition to use for one request (read once; a swap does not affect a running request)."""
        return self._current

    @property
    def epoch(self) -> int | None:
        return self._seen_epoch

    def refresh(self) -> Composition | None:
        """Read the registry now and swap if the epoch changed (the watcher does this by itself)."""
        self.apply(self._client.snapshot())
        return self._current

    def apply(self, snap: RegistrySnapshot) -> None:
        """Load ``snap`` and swap it in; on failure keep serving the last good composition."""
        with self._lock:
            if snap.epoch == self._seen_epoch:
                return
            started = time.perf_counter()
            try:
                comp = self._loader.build(snap)
            except Exception as exc:  # a bad artifact must never take the sampler down
                self.last_error = f"epoch {snap.epoch}: {type(exc).__name__}: {exc}"
                log.error(
                    "hot swap to epoch %d failed, still serving epoch %s: %s",
                    snap.epoch,
                    self._current.epoch if self._current else None,
                    exc,
                )
                if self._metrics is not None:
                    self._metrics.hotswap_failures.inc()
                return
            self._current = comp  # the atomic swap: one reference assignment
            self._seen_epoch = snap.epoch
            self.last_error = None
            self.swaps += 1
            seconds = time.perf_counter() - started
            log.info("serving epoch %d: %s (%.2fs)", snap.epoch, comp.sources if comp else "nothing", seconds)
            if self._metrics is not None:
                self._metrics.hotswap_seconds.observe(seconds)
                self._metrics.registry_epoch.set(snap.epoch)
            if self._on_swap is not None:
                self._on_swap(comp)

    # -- sampling ---------------------------------------------------------------------------------
    def sample(
        self,
        n: int,
        *,
        class_labels: Sequence[int] | None = None,
        sources: Sequence[str] | None = None,
        top_k: int | None = None,
        num_inference_steps: int | None = None,
        scheduler: str | None = None,
        seed: int = 0,
    ) -> tuple[Composition, CompartmentalPipelineOutput]:
        """Sample from the composition current at the start of the call."""
        comp = self._current
        if comp is None:
            raise CdmError("no composition is loaded yet: no compartment and router are registered")
        started = time.perf_counter()
        sc = self._sample
        pipe = CompartmentalPipeline(comp.denoiser, make_scheduler(scheduler or sc.scheduler, comp.model_config))
        out = pipe(
            batch_size=n,
            class_labels=class_labels,
            sources=sources,
            top_k=top_k,
            num_inference_steps=num_inference_steps or sc.num_inference_steps,
            generator=torch.Generator().manual_seed(seed),
            progress=False,
        )
        if self._metrics is not None:
            self._metrics.sampling_seconds.observe(time.perf_counter() - started)
        return comp, out
