"""Hot swap: follow the registry and replace the served composition atomically, never serving a broken one.

On every new epoch the watcher thread loads what changed (compartments are immutable and cached by id),
verifies every sha256 against the registry, builds a new ComposedDenoiser and swaps one reference. Requests
that already hold the old composition finish on it. When loading fails, the last good composition keeps
serving and the error is reported (``last_error``, logs, metrics).
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cdm.compartment import Compartment
from cdm.compose import ComposedDenoiser, Vectorize
from cdm.config import ModelConfig, SampleConfig
from cdm.errors import CdmError
from cdm.pipeline import CompartmentalPipeline, CompartmentalPipelineOutput, make_scheduler
from cdm.router import Router, load_router
from registry.reader import RegistryClient
from registry.records import RegistrySnapshot

log = logging.getLogger(__name__)


def artifact_path(uri: str) -> Path:
    """A registry artifact URI (``file:///abs/dir`` or a plain path) as a local path."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme in ("", "file"):
        return Path(urllib.parse.unquote(parsed.path if parsed.scheme else uri))
    raise CdmError(f"artifact URI {uri!r} has scheme {parsed.scheme!r}; only file:// artifacts can be loaded")


def artifact_uri(path: Path) -> str:
    return path.resolve().as_uri()


@dataclass(frozen=True)
class Composition:
    """What one epoch of the registry serves."""

    epoch: int
    denoiser: ComposedDenoiser
    compartment_ids: tuple[str, ...]
    sources: tuple[str, ...]  # column names of attribution (one per compartment)
    pending: tuple[str, ...] = ()  # active compartments the router does not cover yet (served after retraining)
    loaded_at: float = field(default_factory=time.time)

    @property
    def model_config(self) -> ModelConfig:
        return self.denoiser.model_config


class CompositionLoader:
    """Builds compositions from registry snapshots, caching immutable compartments by id."""

    def __init__(self, *, device: str = "cpu", vectorize: Vectorize = "auto") -> None:
        self.device = device
        self.vectorize: Vectorize = vectorize
        self._compartments: dict[str, Compartment] = {}
        self._router: tuple[str, Router] | None = None

    def build(self, snap: RegistrySnapshot) -> Composition | None:
        """The composition of ``snap``; None while there is nothing to serve (no router or no compartment)."""
        if snap.router is None or not snap.compartments:
            return None
        routed = set(snap.router.compartment_ids)
        records = [c for c in snap.compartments if c.compartment_id in routed]
        pending = tuple(c.compartment_id for c in snap.compartments if c.compartment_id not in routed)
        if not records:
            return None
        # 1. router: reload only when the registry names another one; sha256 verified against the registry
        if self._router is None or self._router[0] != snap.router.router_id:
            router, _ = load_router(
                artifact_path(snap.router.artifact_uri), device=self.device, expected_sha256=snap.router.sha256
            )
            self._router = (snap.router.router_id, router)
        router = self._router[1]
        # 2. compartments: load new ones, reuse cached ones (same id = same bytes)
        loaded = {}
        for rec in records:
            comp = self._compartments.get(rec.compartment_id)
            if comp is None:
                comp = Compartment.load(artifact_path(rec.artifact_uri), device=self.device, expected_sha256=rec.sha256)
            loaded[rec.compartment_id] = comp
        self._compartments = loaded  # drop retired ones from memory
        ids = [r.compartment_id for r in records]
        sources = [r.source for r in records]
        router_sources = [_source_of(cid) for cid in snap.router.compartment_ids]
        den = ComposedDenoiser(
            [loaded[i] for i in ids], router, sources, router_names=router_sources, vectorize=self.vectorize
        )
        return Composition(snap.epoch, den, tuple(ids), tuple(sources), pending)


def _source_of(compartment_id: str) -> str:
    return compartment_id.rsplit("@", 1)[0]


class LiveComposition:
    """The served composition, following the registry in a background thread.

    Args:
        client: registry read client (its Redis connection is the caller's).
        loader: builds compositions (device, vectorisation).
        sample: sampling defaults.
        metrics: optional ``daemon.metrics.Metrics`` (hot-swap seconds, epoch, active compartments).
        resync_s: re-read the epoch at least this often even without a pub/sub event.
    """

    def __init__(
        self,
        client: RegistryClient,
        loader: CompositionLoader,
        *,
        sample: SampleConfig | None = None,
        metrics: Any | None = None,
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


def load_live_composition(
    redis_url: str | None, cfg: Any, *, device: str = "cpu"
) -> tuple[ComposedDenoiser, ModelConfig]:
    """One-shot: the registry's current composition (for ``cdm sample --redis``)."""
    from registry.client import connect
    from registry.keys import Keys

    rc = cfg.redis
    url = redis_url or rc.url
    client = connect(rc, url=redis_url)
    try:
        snap = RegistryClient(client, Keys(rc.namespace)).snapshot()
    finally:
        client.close()
    comp = CompositionLoader(device=device, vectorize=cfg.library.sample.vectorize).build(snap)
    if comp is None:
        raise CdmError(
            f"the registry at {url} serves nothing yet (epoch {snap.epoch}, {len(snap.compartments)} active "
            "compartment(s), router " + ("present" if snap.router else "missing") + "); push a source first"
        )
    return comp.denoiser, comp.model_config


def attribution_summary(out: CompartmentalPipelineOutput) -> dict[str, float]:
    """Mean attribution per source over a batch."""
    return {n: float(v) for n, v in zip(out.source_names, np.asarray(out.attribution).mean(0), strict=True)}
