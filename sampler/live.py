"""Hot swap: follow the registry and replace the served composition atomically, never serving a removed compartment.

A watcher thread checks the registry whenever it may have changed (pub/sub hint, reconnection, every
``resync_s``). Each check reads the snapshot and the tombstones, drops what tombstones forbid
(``sampler.forgetting``), and, when that differs from what is served, asks a builder
(``sampler.loader.CompositionLoader``) for the new composition; then one reference is swapped. Requests that
already hold the old composition finish on it.

Every check stands alone: a malformed record, a missing or tampered artifact or one that does not decode is
logged with the epoch and the reason, counted (``cdm_registry_watch_errors{reason}``), and retried at the next
check; the watcher keeps running. Failing never serves a compartment the registry no longer lists: the previous
composition keeps serving restricted to the compartments still active and not forgotten (or nothing), marked
``degraded``. ``status()`` and ``readiness()`` say whether the watcher is alive and current (its last successful
check is recent and the epoch served is the registry's epoch, in full).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import redis
import torch
from prometheus_client import Counter, Gauge, Histogram

from cdm.artifacts import Discarded, ObjectNotFoundError
from cdm.compose import Composed
from cdm.config import ModelConfig, SampleConfig
from cdm.errors import CdmError, IntegrityError, StoreError
from cdm.pipeline import CompartmentalPipeline, CompartmentalPipelineOutput, make_scheduler
from registry.errors import RecordError
from registry.reader import RegistryClient, Tombstones
from registry.records import CompartmentRecord, RegistrySnapshot, RouterRecord
from sampler.forgetting import (
    compartment_refusal,
    forgotten_sha256,
    purgeable,
    recorded_sha256,
    router_refusal,
    serving_snapshot,
)

log = logging.getLogger(__name__)

MAX_LOGGED_CHARS = 500  # of one error message in logs and status


@dataclass(frozen=True)
class Composition:
    """What one epoch of the registry serves."""

    epoch: int
    denoiser: Composed  # ComposedDenoiser (learnt), DensityComposition (density) or HeadsComposition (heads)
    compartment_ids: tuple[str, ...]
    sources: tuple[str, ...]  # column names of attribution (one per compartment)
    pending: tuple[str, ...] = ()  # active compartments the router does not cover yet (served after retraining)
    loaded_at: float = field(default_factory=time.time)
    records: tuple[CompartmentRecord, ...] = ()  # the registry records of ``compartment_ids`` (same order)
    router: RouterRecord | None = None  # the router's record (learnt routing; None for density)
    routing: str = "learnt"  # the routing kind it was composed under ("learnt" | "density" | "heads")
    degraded: str = ""  # "" = the registry's composition at ``epoch``; else why only a subset of an older one serves

    @property
    def model_config(self) -> ModelConfig:
        return self.denoiser.model_config


class CompositionBuilder(Protocol):
    """Builds compositions (``sampler.loader.CompositionLoader``)."""

    def build(self, snap: RegistrySnapshot) -> Composition | None:
        """The composition of ``snap`` (already less what tombstones forbid); None if there is nothing to serve."""
        ...

    def restrict(self, comp: Composition, keep: Collection[str], *, epoch: int, reason: str) -> Composition | None:
        """``comp`` limited to the compartment ids in ``keep``, without loading anything; None if none is left."""
        ...

    def retain(self, keep: Iterable[CompartmentRecord | RouterRecord]) -> None:
        """Release (unpin) every loaded artifact but those of ``keep``."""
        ...

    def purge(self, digests: Collection[str]) -> Discarded:
        """Delete these blobs from the local cache."""
        ...


class SwapMetrics(Protocol):
    """The metrics a live composition reports (``sampler.metrics.SamplerMetrics`` has them)."""

    hotswap_seconds: Histogram
    hotswap_failures: Counter
    hotswap_last_success: Gauge
    registry_epoch: Gauge
    registry_epoch_seen: Gauge
    registry_watch_last_check: Gauge
    registry_watch_errors: Counter
    composition_degraded: Gauge
    artifact_blobs_purged: Counter
    sampling_seconds: Histogram


@dataclass(frozen=True)
class WatcherStatus:
    """Where the watcher stands (for readiness, /status and tests)."""

    alive: bool  # the watcher thread runs
    registry_epoch: int | None  # newest epoch read from the registry
    served_epoch: int | None  # epoch whose full composition is served (None: none applied yet, or degraded)
    last_check_at: float | None  # clock time of the last successful read of the registry
    last_error: str | None  # why the last check did not apply in full (None once one did)
    failures: int  # checks that did not apply in full, since start
    degraded: str  # "" or why a fail-closed subset of an older composition is served
    refused: tuple[str, ...]  # compartments (and router) of the registry's composition refused as forgotten
    pending_purge: tuple[str, ...]  # forgotten blobs still pinned here (purged at a later check)

    @property
    def current(self) -> bool:
        """The served composition is the registry's newest, in full."""
        return self.registry_epoch is not None and self.registry_epoch == self.served_epoch and not self.degraded


class LiveComposition:
    """The served composition, following the registry in a background thread.

    Args:
        client: registry read client (its Redis connection is the caller's).
        loader: builds compositions (device, vectorisation, artifact cache).
        sample: sampling defaults.
        metrics: optional hot-swap, watch, purge and sampling metrics.
        resync_s: re-read the registry at least this often even without a pub/sub event.
        stale_after_s: not ready when the last successful check is older than this (default 3 x resync_s + 10).
        clock: wall-clock seconds (injectable for tests).
        on_swap: called with every composition swapped in (None: nothing to serve).
    """

    def __init__(
        self,
        client: RegistryClient,
        loader: CompositionBuilder,
        *,
        sample: SampleConfig | None = None,
        metrics: SwapMetrics | None = None,
        resync_s: float = 5.0,
        stale_after_s: float | None = None,
        clock: Callable[[], float] = time.time,
        on_swap: Callable[[Composition | None], None] | None = None,
    ) -> None:
        if resync_s <= 0:
            raise CdmError(f"resync_s = {resync_s} must be > 0")
        self._client = client
        self._loader = loader
        self._sample = sample or SampleConfig()
        self._metrics = metrics
        self._resync_s = resync_s
        self._stale_after_s = stale_after_s if stale_after_s is not None else 3 * resync_s + 10
        self._clock = clock
        self._on_swap = on_swap
        self._current: Composition | None = None
        self._applied: tuple[object, ...] | None = None  # what the last full application served
        self._served_epoch: int | None = None
        self._registry_epoch: int | None = None
        self._last_check_at: float | None = None
        self._refused: tuple[str, ...] = ()
        self._pending_purge: frozenset[str] = frozenset()
        self._purged: set[tuple[str, str]] = set()  # tombstones (source, request id) whose blobs are all gone
        self._lock = threading.Lock()  # serialises checks, never held by readers
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_error: str | None = None
        self._last_logged: str | None = None
        self.failures = 0
        self.swaps = 0

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="cdm-hotswap", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the watcher and unpin the cached files (the served composition stays usable in memory)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._lock.acquire(timeout=timeout):  # a check still running past the timeout keeps its pins until exit
            try:
                self._loader.retain(())
            finally:
                self._lock.release()

    @property
    def watcher_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        """Check at every hint until stopped; nothing but a stop ends this loop."""
        while not self._stop.is_set():
            try:
                for _ in self._client.iter_checks(self._stop, resync_s=self._resync_s):
                    self.check()
            except Exception as exc:  # iter_checks retries connection errors itself; anything else: a bug
                self._failed(self._registry_epoch, "internal", exc)
                self._stop.wait(min(self._resync_s, 5.0))

    # -- reading ----------------------------------------------------------------------------------
    def current(self) -> Composition | None:
        """The composition to use for one request (read once; a swap does not affect a running request)."""
        return self._current

    @property
    def epoch(self) -> int | None:
        """Epoch of the served composition (None before the first)."""
        comp = self._current
        return comp.epoch if comp is not None else self._served_epoch

    def status(self) -> WatcherStatus:
        comp = self._current
        return WatcherStatus(
            alive=self.watcher_alive,
            registry_epoch=self._registry_epoch,
            served_epoch=self._served_epoch,
            last_check_at=self._last_check_at,
            last_error=self.last_error,
            failures=self.failures,
            degraded=comp.degraded if comp is not None else "",
            refused=self._refused,
            pending_purge=tuple(sorted(self._pending_purge)),
        )

    def readiness(self) -> tuple[bool, str]:
        """Ready when the watcher is alive and current, and something is served."""
        s = self.status()
        if not s.alive:
            return False, "the registry watcher is not running"
        if s.last_check_at is None:
            return False, "the registry has not been read yet"
        age = self._clock() - s.last_check_at
        if age > self._stale_after_s:
            return False, f"no successful registry check for {age:.0f}s (limit {self._stale_after_s:.0f}s)"
        if not s.current:
            served = f"a fail-closed subset ({s.degraded})" if s.degraded else f"epoch {s.served_epoch}"
            return False, f"serving {served} while the registry is at epoch {s.registry_epoch}: {s.last_error}"
        if self._current is None:
            return False, f"nothing to serve at epoch {s.registry_epoch} (no compartment and router registered)"
        return True, f"serving epoch {s.served_epoch}"

    # -- checking and swapping --------------------------------------------------------------------
    def refresh(self) -> Composition | None:
        """Check the registry now (the watcher does this by itself); returns the served composition."""
        self.check()
        return self._current

    def check(self) -> None:
        """One watcher step: read the registry, apply what changed, purge forgotten blobs. Never raises."""
        with self._lock:
            try:
                self._check()
            except Exception as exc:  # a bug must not end the watcher: count it, keep serving fail-closed
                self._failed(self._registry_epoch, "internal", exc)

    def _check(self) -> None:
        # 1. read the composition and the tombstones (after it: a forget that lands in between is seen)
        try:
            try:
                snap: RegistrySnapshot | None = self._client.snapshot()
                decode_error: RecordError | None = None
            except RecordError as exc:
                snap, decode_error = None, exc
            tombstones = self._client.tombstones(also=self._known_sources(snap))
            if snap is None:
                epoch, active = self._client.epoch(), self._client.active_ids()
        except redis.RedisError as exc:  # the registry is unreachable: nothing can change there either
            self._failed(self._registry_epoch, "registry", exc)
            return
        if snap is None:
            assert decode_error is not None
            # 2a. a record of this epoch does not decode: withhold what is no longer active or is forgotten
            self._set_registry_epoch(epoch)
            self._failed(epoch, "record", decode_error, hotswap=True)
            self._fail_closed(epoch, tombstones, lambda r: r.compartment_id in active, "a registry record is malformed")
            self._purge(tombstones)
            return
        self._apply(snap, tombstones)

    def _apply(self, snap: RegistrySnapshot, tombstones: Tombstones) -> None:
        self._set_registry_epoch(snap.epoch)
        self._last_check_at = self._clock()
        if self._metrics is not None:
            self._metrics.registry_watch_last_check.set(self._last_check_at)
        serving = serving_snapshot(snap, tombstones)
        self._refused = tuple(f"{k}: {v}" for k, v in sorted(serving.refused.items()))
        if tombstones.unreadable:
            self._count("tombstone", f"unreadable tombstone(s), their sources are not served: {tombstones.unreadable}")
        # 2b. build when what may be served differs from what is served (new epoch, new tombstone, failed before);
        # compartments and the router come from the loader's cache unless their (id, sha256) is new
        target = (snap.epoch, serving.snapshot.compartments, serving.snapshot.router)
        if target != self._applied:
            started = time.perf_counter()
            try:
                comp = self._loader.build(serving.snapshot)
            except Exception as exc:  # a bad artifact must never take the sampler down, nor resurrect a removal
                self._failed(snap.epoch, _reason(exc), exc, hotswap=True)
                allowed = {_content(r) for r in serving.snapshot.compartments}
                self._fail_closed(snap.epoch, tombstones, lambda r: _content(r) in allowed, "epoch failed to load")
                # what the failed build did load stays for the retry at the next check; nothing else
                self._loader.retain((*_records(self._current), *_records(serving.snapshot)))
            else:
                self._swap(comp)
                self._applied, self._served_epoch, self.last_error = target, snap.epoch, None
                seconds = time.perf_counter() - started
                log.info("serving epoch %d: %s (%.2fs)", snap.epoch, comp.sources if comp else "nothing", seconds)
                if self._metrics is not None:
                    self._metrics.hotswap_seconds.observe(seconds)
                    self._metrics.registry_epoch.set(snap.epoch)
                    self._metrics.hotswap_last_success.set_to_current_time()
        else:
            self.last_error = None  # read and current again (e.g. after a registry outage)
        if self._applied == target and not tombstones.unreadable:
            self._last_logged = None  # healthy: the next failure is logged again, even if worded the same
        # 3. forgotten blobs leave the local cache once nothing served uses them
        self._purge(tombstones, serving.snapshot)

    def _fail_closed(
        self, epoch: int, tombstones: Tombstones, still_active: Callable[[CompartmentRecord], bool], why: str
    ) -> None:
        """Keep serving the current composition less every compartment not ``still_active`` or forgotten."""
        comp = self._current
        if comp is None:
            return
        forgotten = forgotten_sha256(tombstones)
        keep = [
            r.compartment_id
            for r in comp.records
            if still_active(r) and compartment_refusal(r, tombstones, forgotten) is None
        ]
        router_ok = comp.router is None or router_refusal(comp.router, forgotten) is None  # none: density routing
        if router_ok and len(keep) == len(comp.records):
            return  # nothing it serves was removed: keep it as it is (stale, so not ready)
        dropped = sorted(set(comp.compartment_ids) - set(keep)) if router_ok else list(comp.compartment_ids)
        reason = f"epoch {epoch}: {why}; serving epoch {comp.epoch} without {dropped}"
        try:
            restricted = self._loader.restrict(comp, keep, epoch=epoch, reason=reason) if router_ok else None
        except Exception as exc:  # nothing is loaded here, but if it fails serve nothing rather than the removed
            self._failed(epoch, "internal", exc)
            restricted = None
        log.error("fail closed at %s; serving %s", reason, restricted.sources if restricted else "nothing")
        self._applied = None  # retry the full composition at the next check
        self._swap(restricted)

    def _swap(self, comp: Composition | None) -> None:
        self._current = comp  # the atomic swap: one reference assignment
        self.swaps += 1
        self._loader.retain(_records(comp))  # unpin what the new composition no longer uses
        if self._metrics is not None:
            self._metrics.composition_degraded.set(1 if comp is not None and comp.degraded else 0)
        if self._on_swap is not None:
            self._on_swap(comp)

    def _purge(self, tombstones: Tombstones, serving: RegistrySnapshot | None = None) -> None:
        """Delete the blobs tombstones list from the local cache, except those of what is served or may be."""
        served = (*_records(serving), *_records(self._current))
        pinned: set[str] = set()
        for key, digests in purgeable(tombstones, served).items():
            if key in self._purged:
                continue
            done = self._loader.purge(digests)
            if done.removed:
                log.info("purged %d cached file(s) of forgotten source %r: %s", len(done.removed), key[0], done.removed)
                if self._metrics is not None:
                    self._metrics.artifact_blobs_purged.inc(len(done.removed))
            if done.pinned:
                pinned.update(done.pinned)
            else:
                self._purged.add(key)
        self._pending_purge = frozenset(pinned)

    def _set_registry_epoch(self, epoch: int) -> None:
        self._registry_epoch = epoch
        if self._metrics is not None:
            self._metrics.registry_epoch_seen.set(epoch)

    def _known_sources(self, snap: RegistrySnapshot | None) -> set[str]:
        """Sources whose tombstones matter beyond the registered ones: those served or in ``snap``."""
        comp = self._current
        records = (*(snap.compartments if snap else ()), *(comp.records if comp else ()))
        return {r.source for r in records}

    def _failed(self, epoch: int | None, reason: str, exc: BaseException, *, hotswap: bool = False) -> None:
        """A check that did not apply in full: counted, logged with the epoch and reason, kept for status."""
        self.failures += 1
        if hotswap and self._metrics is not None:
            self._metrics.hotswap_failures.inc()
        self.last_error = f"epoch {epoch} not applied ({reason}): {type(exc).__name__}: {_brief(exc)}"
        self._count(reason, self.last_error)

    def _count(self, reason: str, message: str) -> None:
        if self._metrics is not None:
            self._metrics.registry_watch_errors.labels(reason=reason).inc()
        if message != self._last_logged:  # the same failure at every check is logged once
            served = self._current.epoch if self._current is not None else None
            log.error("%s; serving epoch %s", message, served)
        self._last_logged = message

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
        guidance_scale: float | None = None,
    ) -> tuple[Composition, CompartmentalPipelineOutput]:
        """Sample from the composition current at the start of the call (``guidance_scale`` None: [sample]'s)."""
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
            guidance_scale=guidance_scale if guidance_scale is not None else sc.guidance_scale,
        )
        if self._metrics is not None:
            self._metrics.sampling_seconds.observe(time.perf_counter() - started)
        return comp, out


def _records(what: Composition | RegistrySnapshot | None) -> tuple[CompartmentRecord | RouterRecord, ...]:
    """The compartment and router records of a composition or snapshot."""
    if what is None:
        return ()
    records = what.records if isinstance(what, Composition) else what.compartments
    return (*records, what.router) if what.router is not None else records


def _content(record: CompartmentRecord) -> tuple[str, tuple[tuple[str, str], ...]]:
    """A compartment's identity for serving: its id and recorded sha256s (a changed record is another one)."""
    return record.compartment_id, tuple(sorted(recorded_sha256(record).items()))


def _reason(exc: BaseException) -> str:
    """The metric label of a failed build."""
    if isinstance(exc, RecordError):
        return "record"
    if isinstance(exc, ObjectNotFoundError):
        return "missing"
    if isinstance(exc, IntegrityError):
        return "integrity"
    if isinstance(exc, StoreError):
        return "artifact" if "missing" not in str(exc) else "missing"
    if isinstance(exc, redis.RedisError):
        return "registry"
    return "decode"


def _brief(exc: BaseException) -> str:
    text = str(exc)
    return text if len(text) <= MAX_LOGGED_CHARS else f"{text[:MAX_LOGGED_CHARS]}… ({len(text)} characters)"
