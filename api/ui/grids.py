"""Sample grids for the status pages: drawn in one background thread, cached per (epoch, sources).

A page view never samples and never waits: ``GridCache.get`` answers from the cache, or queues the drawing and
answers "drawing" (the page's auto-refresh shows the grid once it is there). A failed drawing is shown with its
error and retried after ``retry_s``. The grid is deterministic per key (fixed seed), so every view of one epoch
shows the same images.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from cdm.config import SampleConfig
from cdm.viz import grid_png
from common.redact import safe
from sampler.engine import SampleRequest, sample_now
from sampler.live import Composition

log = logging.getLogger(__name__)

Key = tuple[int, tuple[str, ...]]  # (epoch, sources drawn)


@dataclass(frozen=True)
class GridSpec:
    """How the status pages' grids are drawn: small, so drawing one is cheap next to training or serving."""

    n: int = 8  # images (one row); labels cycle 0, 1, ... when the compartments are class-conditional
    steps: int = 10  # denoising steps
    scheduler: str = "ddim"
    seed: int = 0
    tile_px: int = 64  # each image is scaled up (nearest) to about this many pixels

    @classmethod
    def of(cls, sample: SampleConfig, max_steps: int = 20) -> GridSpec:
        """DDIM with ``[sample] num_inference_steps``, at most ``max_steps`` (a page's grid is a glance)."""
        return cls(steps=max(1, min(sample.num_inference_steps, max_steps)))


@dataclass(frozen=True)
class Grid:
    """One grid, or why there is none yet."""

    epoch: int
    sources: tuple[str, ...]
    state: str  # "ready" | "drawing" | "failed"
    png: bytes = b""
    attribution: tuple[float, ...] = ()  # mean attribution per source over the images
    error: str = ""
    at: float = 0.0  # monotonic time drawn (or failed)


Draw = Callable[[Composition, tuple[str, ...]], tuple[bytes, np.ndarray]]


def draw_grid(spec: GridSpec) -> Draw:
    """The default drawing: ``spec.n`` samples of ``sources`` (sampler.engine.sample_now) as a PNG with bars."""

    def draw(comp: Composition, sources: tuple[str, ...]) -> tuple[bytes, np.ndarray]:
        k = comp.denoiser.num_classes
        request = SampleRequest(
            composition=comp,
            sources=sources,
            n=spec.n,
            steps=spec.steps,
            scheduler=spec.scheduler,
            seed=spec.seed,
            labels=tuple(i % k for i in range(spec.n)) if k else None,
        )
        result = sample_now(request)
        scale = max(1, round(spec.tile_px / max(1, result.images.shape[1])))
        png = grid_png(
            result.images, nrow=spec.n, scale=scale, attribution=result.attribution, source_names=list(sources)
        )
        return png, result.attribution

    return draw


class GridCache:
    """Grids per (epoch, sources), drawn by one background thread (started on first use).

    Args:
        spec: what a grid is (also shown on the page).
        draw: (composition, sources) -> (PNG bytes, attribution (N, K)); default ``draw_grid(spec)``.
        max_entries: grids kept (least recently used dropped first); on ``cdm serve`` one per distinct set of
            sources callers may see.
        retry_s: a failed drawing is tried again after this long.
        clock: monotonic seconds.
    """

    def __init__(
        self,
        spec: GridSpec | None = None,
        *,
        draw: Draw | None = None,
        max_entries: int = 16,
        retry_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries = {max_entries} must be >= 1")
        self.spec = spec or GridSpec()
        self._draw = draw or draw_grid(self.spec)
        self._max = max_entries
        self._retry_s = retry_s
        self._clock = clock
        self._grids: OrderedDict[Key, Grid] = OrderedDict()
        self._queue: queue.Queue[tuple[Key, Composition]] = queue.Queue()
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def get(self, comp: Composition, sources: tuple[str, ...]) -> Grid:
        """The grid of ``sources`` at ``comp``'s epoch, or a "drawing" placeholder (queued now); never blocks on
        drawing."""
        key = (comp.epoch, tuple(sources))
        with self._lock:
            grid = self._grids.get(key)
            if grid is not None:
                self._grids.move_to_end(key)
                if grid.state != "failed" or self._clock() - grid.at < self._retry_s:
                    return grid
            placeholder = Grid(key[0], key[1], "drawing", at=self._clock())
            self._put(key, placeholder)
            self._ensure_thread()
        self._queue.put((key, comp))
        return placeholder

    def wait(self, comp: Composition, sources: tuple[str, ...], timeout: float) -> Grid:
        """``get``, then wait up to ``timeout`` seconds for the drawing to finish (tests, pre-warming)."""
        grid = self.get(comp, sources)
        deadline = time.monotonic() + timeout
        key = (comp.epoch, tuple(sources))
        with self._lock:
            while grid.state == "drawing" and time.monotonic() < deadline:
                self._done.wait(min(0.5, max(0.0, deadline - time.monotonic())))
                grid = self._grids.get(key, grid)
        return grid

    def close(self, timeout: float = 10.0) -> None:
        """Stop the drawing thread (a drawing in progress finishes first)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the drawing thread

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="cdm-ui-grids", daemon=True)
            self._thread.start()

    def _put(self, key: Key, grid: Grid) -> None:
        self._grids[key] = grid
        self._grids.move_to_end(key)
        while len(self._grids) > self._max:
            self._grids.popitem(last=False)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                key, comp = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            with self._lock:
                current = self._grids.get(key)
            if current is None or current.state != "drawing":
                continue  # evicted meanwhile, or drawn by an earlier queue entry
            started = time.perf_counter()
            try:
                png, attribution = self._draw(comp, key[1])
                att = np.asarray(attribution, dtype=np.float64)
                means = tuple(float(v) for v in att.mean(axis=0)) if att.size else ()
                grid = Grid(key[0], key[1], "ready", png=png, attribution=means, at=self._clock())
                log.info("status page grid for epoch %d drawn in %.2fs", key[0], time.perf_counter() - started)
            except Exception as exc:  # a broken composition must not kill the page's thread; shown on the page
                log.exception("status page grid for epoch %d failed", key[0])
                grid = Grid(key[0], key[1], "failed", error=safe(f"{type(exc).__name__}: {exc}"), at=self._clock())
            with self._lock:
                if key in self._grids:
                    self._put(key, grid)
                self._done.notify_all()
