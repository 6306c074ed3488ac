"""Cross-request batching: ``BatchingSampler``, continuous (iteration-level) batching of sampling requests.

A scheduler in front of the model (Triton's dynamic batcher; Orca's iteration-level scheduling): one engine thread
owns the compute. Every request becomes rows with its own allowed mask over its composition's sources, labels,
top k, guidance scale, scheduler instance, timesteps and random generator, so a request's images depend on its
seed only, never on what else is in the batch (equal to ``PerRequestSampler``'s within float tolerance). Each
engine iteration:

1. admit: queued requests join at the start of an iteration, first come first served, while the active rows stay
   within ``max_batch_rows`` (a request larger than the cap runs alone). When the engine is idle it waits up to
   ``max_wait_s`` after the first arrival so that a burst starts together; running requests never wait.
2. pick one composition: requests keep the composition they were admitted with (hot swap), and rows of two
   compositions never share an iteration; while several are active the iterations take turns (round robin).
3. one composed call on the rows of every active request of that composition, the per-row timesteps, labels,
   allowed masks and top k concatenated. Learnt kind: ``ComposedDenoiser.compose``, each compartment once on
   exactly the rows allowed to use it. Density kind: each request keeps its own ``DensityTrajectory`` (per-row
   log-density state); the engine plans every trajectory's step, evaluates each compartment once on the
   concatenation of the calls planned for it, and gives each trajectory its outputs back (``plan``/``finish``).
   Rows with guidance (scale != 1 and labels) bring a null-label twin; eps = eps_null + s (eps_c - eps_null), each
   branch with its own weights (``cdm.guidance.guide``), as ``Guided`` does for one request.
4. each request's scheduler steps its own slice with its own generator; finished requests get their images and
   attribution (over exactly their sources, as ``sample_now``); cancelled or timed-out requests drop out.

The engine thread starts with the first request and exits after ``idle_exit_s`` without work, so the sampler holds
no thread while idle and needs no start call (``close`` ends it for good). ``/v1/attribute`` is not batched: it runs
in a worker thread, one at a time (the learnt kind's router only; the density kind's allowed compartments, on their
own batch of noised copies of the image).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.to_thread
import numpy as np
import torch

from cdm.attribution import attribute
from cdm.compose import ComposedDenoiser, check_top_k
from cdm.data import from_model_tensor
from cdm.errors import ConfigError
from cdm.guidance import check_guidance_scale, guide
from cdm.image_attribution import ImageAttribution
from cdm.pipeline import expand_labels, make_scheduler
from cdm.routing.density import DensityComposition, DensityPlan, DensityTrajectory
from sampler.engine import AttributeRequest, SampleRequest, SampleResult, attribute_now
from sampler.errors import SamplerUnavailable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Iteration:
    """One engine iteration, for metrics and tests.

    epoch: the composition's epoch. kind: its routing kind. requests: the requests stepped. rows: model rows
    (guided requests count twice). inputs: per request, its (rows, C, H, W) model input (its conditional rows, then
    its null-label twins); the composed call took their concatenation. owners: per row of that concatenation, the
    index in ``requests`` of the request it belongs to. seconds: wall time of the iteration.
    """

    epoch: int
    kind: str
    requests: tuple[SampleRequest, ...]
    rows: int
    inputs: tuple[torch.Tensor, ...]
    owners: tuple[int, ...]
    seconds: float


def request_rows(request: SampleRequest) -> int:
    """Model rows of a request per step: n, twice that under guidance (labels and a scale != 1)."""
    guided = request.labels is not None and request.guidance_scale != 1.0
    return request.n * (2 if guided else 1)


class _Job:
    """A request in the engine: its state between iterations."""

    def __init__(self, request: SampleRequest, deadline: float) -> None:
        self.request = request
        self.future: concurrent.futures.Future[SampleResult] = concurrent.futures.Future()
        self.deadline = deadline
        self.rows = request_rows(request)
        self.submitted = time.perf_counter()
        self.step = 0
        self.weights: list[torch.Tensor] = []  # (n, K) per step, float32 on the CPU (the attribution trajectory)
        # set by ``_start``, in the engine thread
        self.scheduler: Any = None  # a diffusers scheduler of its own
        self.generator = torch.Generator()
        self.x = torch.empty(0)
        self.timesteps = torch.empty(0)
        self.labels: torch.Tensor | None = None  # (n,) or None (unconditional)
        self.scale: float | None = None  # guidance scale when guided, else None
        self.mask = torch.empty(0, dtype=torch.bool)  # (rows, K) over the composition's names
        self.top_k: torch.Tensor | None = None  # (rows,) k per row; None = the composition's own mode
        self.trajectory: DensityTrajectory | None = None  # density kind: this request's log-density state
        self.plan: DensityPlan | None = None

    @property
    def n(self) -> int:
        return self.request.n

    @property
    def done(self) -> bool:
        return self.future.done()


class BatchingSampler:
    """The ``Sampler`` of ``cdm serve`` with ``[serve] batching = true``: continuous batching across requests.

    Args:
        max_batch_rows: model rows one iteration may hold (guided requests count twice); a request with more
            rows runs alone.
        max_wait_s: how long an idle engine waits after the first arrival for more requests to start with it.
        timeout_s: a request not finished this long after it was submitted fails with ``SamplerUnavailable``.
        idle_exit_s: the engine thread exits after this long without work (the next request starts it again).
        observe: called with the seconds each sampling request took, queueing included.
        on_iteration: called after every engine iteration (metrics, tests), in the engine thread.
    """

    def __init__(
        self,
        *,
        max_batch_rows: int = 64,
        max_wait_s: float = 0.005,
        timeout_s: float = 600.0,
        idle_exit_s: float = 2.0,
        observe: Callable[[float], None] | None = None,
        on_iteration: Callable[[Iteration], None] | None = None,
    ) -> None:
        if max_batch_rows < 1:
            raise ValueError(f"max_batch_rows = {max_batch_rows} must be >= 1")
        if max_wait_s < 0 or timeout_s <= 0 or idle_exit_s <= 0:
            raise ValueError(
                f"max_wait_s = {max_wait_s} must be >= 0, timeout_s = {timeout_s} and idle_exit_s = {idle_exit_s} > 0"
            )
        self.max_batch_rows = max_batch_rows
        self.max_wait_s = max_wait_s
        self.timeout_s = timeout_s
        self.idle_exit_s = idle_exit_s
        self._observe = observe
        self._on_iteration = on_iteration
        self._cond = threading.Condition()
        self._queue: deque[_Job] = deque()  # submitted, not admitted (guarded by _cond)
        self._thread: threading.Thread | None = None  # guarded by _cond
        self._closed = False
        self._groups: dict[int, list[_Job]] = {}  # id(composition) -> its active jobs (engine thread only)
        self._turn: deque[int] = deque()  # round robin over the keys of _groups
        self._attribute_limiter: anyio.CapacityLimiter | None = None
        self.iterations = 0  # engine iterations so far (for tests and the benchmark)

    # -- the Sampler protocol ---------------------------------------------------------------------
    async def sample(self, request: SampleRequest) -> SampleResult:
        """Queue ``request`` and wait for it; cancelling the wait drops its rows at the next iteration."""
        future = self.submit(request)
        result = await asyncio.wrap_future(future)  # a cancelled await cancels ``future`` (still pending)
        if self._observe is not None:
            self._observe(result.seconds)
        return result

    async def attribute(self, request: AttributeRequest) -> ImageAttribution:
        """P(source | image) (``attribute_now``) in a worker thread, one at a time, outside the engine's batches."""
        if self._attribute_limiter is None:
            self._attribute_limiter = anyio.CapacityLimiter(1)
        return await anyio.to_thread.run_sync(attribute_now, request, limiter=self._attribute_limiter)

    # -- thread-side API ----------------------------------------------------------------------------
    def submit(self, request: SampleRequest) -> concurrent.futures.Future[SampleResult]:
        """Queue ``request`` from any thread; the future holds its result (``cancel()`` it to give up)."""
        job = _Job(request, time.monotonic() + self.timeout_s)
        with self._cond:
            if self._closed:
                raise SamplerUnavailable("the sampler is shutting down; retry on another replica")
            self._queue.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="cdm-batching", daemon=True)
                self._thread.start()
            self._cond.notify_all()
        return job.future

    def close(self, timeout: float = 30.0) -> None:
        """Stop the engine: queued and running requests fail with ``SamplerUnavailable``; later submits too."""
        with self._cond:
            self._closed = True
            thread = self._thread
            self._cond.notify_all()
        if thread is not None:
            thread.join(timeout)

    @property
    def running(self) -> bool:
        """Whether the engine thread is alive now."""
        with self._cond:
            return self._thread is not None

    # -- the engine ---------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                admitted = self._admit()
                if admitted is None:
                    return
                for job in admitted:
                    self._start(job)
                self._expire()
                key = self._next_group()
                if key is not None:
                    self._iterate(self._groups[key])
        except BaseException as exc:  # the engine must never die silently: fail every request it holds
            log.exception("the batching engine failed")
            with self._cond:
                queued = list(self._queue)
                self._queue.clear()
                self._thread = None
            for job in [*queued, *(j for group in self._groups.values() for j in group)]:
                _fail(job, SamplerUnavailable(f"the sampling engine failed ({type(exc).__name__}: {exc}); retry"))
            self._groups.clear()
            self._turn.clear()
            raise

    def _admit(self) -> list[_Job] | None:
        """Queued jobs that join now (within the row cap); None when the engine thread should exit (idle or closed)."""
        active_rows = sum(j.rows for group in self._groups.values() for j in group)
        with self._cond:
            # 1. an idle engine waits for work; after idle_exit_s without any it exits (the next submit restarts it)
            self._drop_dead_queued()
            while not self._closed and not active_rows and not self._queue:
                if not self._cond.wait(self.idle_exit_s) and not self._queue and not self._closed:
                    self._thread = None
                    return None
                self._drop_dead_queued()
            if not self._closed and not active_rows and self.max_wait_s > 0:
                # 2. an idle engine lets a burst gather, up to max_wait_s or a full batch (running requests never wait)
                until = time.monotonic() + self.max_wait_s
                while not self._closed and sum(j.rows for j in self._queue) < self.max_batch_rows:
                    left = until - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                self._drop_dead_queued()
            if not self._closed:
                # 3. first come, first served within the row cap (a lone oversized request runs by itself)
                admitted: list[_Job] = []
                rows = active_rows
                while self._queue:
                    job = self._queue[0]
                    if rows and rows + job.rows > self.max_batch_rows:
                        break
                    self._queue.popleft()
                    admitted.append(job)
                    rows += job.rows
                return admitted
            # 4. closed: every queued and running request fails, and the thread ends
            self._thread = None
            doomed = [*self._queue, *(j for group in self._groups.values() for j in group)]
            self._queue.clear()
        for job in doomed:
            _fail(job, SamplerUnavailable("the sampler is shutting down; retry on another replica"))
        self._groups.clear()
        self._turn.clear()
        return None

    def _drop_dead_queued(self) -> None:
        """Queued jobs whose caller gave up or whose time ran out leave the queue (with _cond held)."""
        now = time.monotonic()
        for job in [j for j in self._queue if j.future.cancelled() or j.deadline <= now]:
            self._queue.remove(job)
            if not job.future.cancelled():
                _fail(job, _timed_out(job, self.timeout_s))

    def _expire(self) -> None:
        """Active jobs whose caller gave up, or that ran out of time, leave their group."""
        now = time.monotonic()
        for key, group in list(self._groups.items()):
            for job in [j for j in group if j.future.cancelled() or j.deadline <= now]:
                group.remove(job)
                if not job.future.cancelled():
                    _fail(job, _timed_out(job, self.timeout_s))
            if not group:
                self._remove_group(key)

    def _next_group(self) -> int | None:
        """The composition whose requests step in this iteration (round robin)."""
        if not self._turn:
            return None
        key = self._turn[0]
        self._turn.rotate(-1)
        return key

    def _remove_group(self, key: int) -> None:
        del self._groups[key]
        self._turn.remove(key)

    @torch.no_grad()
    def _start(self, job: _Job) -> None:
        """Set up a job's rows as ``CompartmentalPipeline`` would for it alone (same draws from the same seed)."""
        req = job.request
        try:
            comp = req.composition.denoiser
            device = comp.device
            sched = make_scheduler(req.scheduler, comp.model_config)
            labels = expand_labels(req.labels, req.n, device, comp.num_classes)
            scale = check_guidance_scale(req.guidance_scale)
            if labels is None:
                scale = 1.0  # guidance without labels is a no-op, as in the pipeline
            generator = torch.Generator().manual_seed(req.seed)
            # 1. the composition's own checks (allowed sets, top k, guidance; density: a trajectory for this request)
            den = comp.sampler(
                req.n,
                allowed=list(req.sources),
                top_k=req.top_k,
                guidance_scale=scale,
                scheduler=sched,
                generator=generator,
            )
            rows = req.n * (2 if scale != 1.0 else 1)
            mask = comp.allowed(list(req.sources), req.n, device)
            job.mask = mask.repeat(2, 1) if scale != 1.0 else mask
            if isinstance(comp, DensityComposition):
                inner = getattr(den, "inner", den)
                if not isinstance(inner, DensityTrajectory):
                    raise ConfigError(f"the density composition made a {type(inner).__name__}, not a trajectory")
                job.trajectory = inner
            elif isinstance(comp, ComposedDenoiser):
                k = check_top_k(req.top_k, req.n)
                default = comp.top_k if comp.mode == "top_k" else len(comp.source_names)
                per_row = torch.full((req.n,), default if k is None else int(k), dtype=torch.long, device=device)
                job.top_k = per_row.repeat(2) if scale != 1.0 else per_row
            else:
                raise ConfigError(f"cannot batch a {type(comp).__name__}; the kinds are learnt and density")
            # 2. the initial noise and timesteps, drawn in the pipeline's order
            x = torch.randn((req.n, *comp.sample_shape), generator=generator).to(device)
            sched.set_timesteps(req.steps)
            job.x = x * sched.init_noise_sigma
            job.timesteps = sched.timesteps
            job.scheduler, job.generator, job.labels = sched, generator, labels
            job.scale = scale if scale != 1.0 else None
            assert job.rows == rows, (job.rows, rows)
        except Exception as exc:  # a bad request fails alone (ConfigError -> 422 in the API)
            _fail(job, exc)
            return
        key = id(req.composition)
        if key not in self._groups:
            self._groups[key] = []
            self._turn.append(key)
        self._groups[key].append(job)

    @torch.no_grad()
    def _iterate(self, group: list[_Job]) -> None:
        """One step of every job in ``group`` (one composition), each compartment called at most once."""
        started = time.perf_counter()
        comp = group[0].request.composition
        den = comp.denoiser
        device = den.device
        jobs = list(group)
        # 1. each job's model input: its rows, and under guidance the null-label twins
        inputs, times, labels = [], [], []
        for job in jobs:
            t = job.timesteps[job.step]
            xin = job.scheduler.scale_model_input(job.x, t)
            c = job.labels
            if job.scale is not None:
                assert c is not None
                xin, c = torch.cat([xin, xin]), torch.cat([c, torch.full_like(c, den.num_classes)])
            inputs.append(xin)
            times.append(t.to(device).long().expand(job.rows))
            labels.append(c)
        # 2. the composed eps and weights of every job
        try:
            if isinstance(den, DensityComposition):
                outs = self._density_step(den, jobs, inputs, times, labels)
            else:
                assert isinstance(den, ComposedDenoiser)
                outs = self._learnt_step(den, jobs, inputs, times, labels)
        except Exception as exc:  # a failing compartment fails the requests that were stepping with it
            log.exception("a batched step of epoch %d failed", comp.epoch)
            for job in jobs:
                group.remove(job)
                _fail(job, exc)
            self._prune_empty()
            return
        # 3. each job's scheduler step on its own slice, with its own generator
        for job, out in zip(jobs, outs, strict=True):
            if isinstance(out, BaseException):
                group.remove(job)
                _fail(job, out)
                continue
            eps, w = out
            t = job.timesteps[job.step]
            job.weights.append(w.float().cpu())
            job.x = job.scheduler.step(eps, t, job.x, generator=job.generator).prev_sample
            job.step += 1
            if job.step == len(job.timesteps):
                group.remove(job)
                self._finish(job)
        self._prune_empty()
        self.iterations += 1
        if self._on_iteration is not None:
            owners = tuple(i for i, job in enumerate(jobs) for _ in range(job.rows))
            self._on_iteration(
                Iteration(
                    epoch=comp.epoch,
                    kind=den.kind,
                    requests=tuple(j.request for j in jobs),
                    rows=len(owners),
                    inputs=tuple(inputs),
                    owners=owners,
                    seconds=time.perf_counter() - started,
                )
            )

    def _prune_empty(self) -> None:
        for key in [k for k, g in self._groups.items() if not g]:
            self._remove_group(key)

    @staticmethod
    def _learnt_step(
        den: ComposedDenoiser,
        jobs: Sequence[_Job],
        inputs: Sequence[torch.Tensor],
        times: Sequence[torch.Tensor],
        labels: Sequence[torch.Tensor | None],
    ) -> list[tuple[torch.Tensor, torch.Tensor] | BaseException]:
        """ONE ``compose`` over every job's rows, per-row allowed masks and top k; split back per job."""
        x = torch.cat(list(inputs))
        c = _cat_labels(labels, [j.rows for j in jobs], den.num_classes, x.device)
        out = den.compose(
            x,
            torch.cat(list(times)),
            c,
            allowed=torch.cat([j.mask for j in jobs]),
            top_k=torch.cat([j.top_k for j in jobs if j.top_k is not None]),
        )
        results: list[tuple[torch.Tensor, torch.Tensor] | BaseException] = []
        start = 0
        for job in jobs:
            eps, w = out.eps[start : start + job.rows], out.weights[start : start + job.rows]
            start += job.rows
            results.append(_guided(job, eps, w))
        return results

    @staticmethod
    def _density_step(
        den: DensityComposition,
        jobs: Sequence[_Job],
        inputs: Sequence[torch.Tensor],
        times: Sequence[torch.Tensor],
        labels: Sequence[torch.Tensor | None],
    ) -> list[tuple[torch.Tensor, torch.Tensor] | BaseException]:
        """Plan every job's trajectory step, call each compartment once on all the rows planned for it, finish."""
        results: list[tuple[torch.Tensor, torch.Tensor] | BaseException | None] = [None] * len(jobs)
        plans: list[DensityPlan | None] = []
        for i, (job, xin, t, c) in enumerate(zip(jobs, inputs, times, labels, strict=True)):
            assert job.trajectory is not None
            try:
                plans.append(job.trajectory.plan(xin, t, c))
            except Exception as exc:  # this request's own problem (e.g. a timestep that does not decrease)
                plans.append(None)
                results[i] = exc
        # 1. every compartment once, on the concatenation of its calls over the jobs
        outputs: list[dict[int, torch.Tensor]] = [{} for _ in jobs]
        for index in range(len(den.compartments)):
            calls = [
                (i, pos, call)
                for i, plan in enumerate(plans)
                if plan is not None
                for pos, call in enumerate(plan.calls)
                if call.index == index
            ]
            if not calls:
                continue
            x = torch.cat([call.x for _, _, call in calls])
            sizes = [call.x.shape[0] for _, _, call in calls]
            c = _cat_labels([call.class_labels for _, _, call in calls], sizes, den.num_classes, x.device)
            eps = den.compartments[index](x, torch.cat([call.t for _, _, call in calls]), c)
            for (i, pos, _), part in zip(calls, eps.split(sizes), strict=True):
                outputs[i][pos] = part
        # 2. each trajectory advances its own log-densities
        for i, (job, plan) in enumerate(zip(jobs, plans, strict=True)):
            if plan is None:
                continue
            assert job.trajectory is not None
            try:
                step = job.trajectory.finish(plan, [outputs[i][pos] for pos in range(len(plan.calls))])
            except Exception as exc:  # e.g. the Itô estimator refusing a deterministic sampler
                results[i] = exc
                continue
            results[i] = _guided(job, step.eps, step.weights)
        return [r if r is not None else RuntimeError("no result") for r in results]

    def _finish(self, job: _Job) -> None:
        """Images and attribution over exactly the request's sources, as ``sample_now`` returns them."""
        req = job.request
        try:
            den = req.composition.denoiser
            sched = job.scheduler
            trajectory = torch.stack(job.weights).numpy()
            abar = sched.alphas_cumprod[sched.timesteps.cpu().long()].double().numpy()
            att = attribute(trajectory, abar, "mean").astype(np.float32)
            cols = [den.source_names.index(s) for s in req.sources]
            result = SampleResult(
                epoch=req.composition.epoch,
                sources=req.sources,
                images=from_model_tensor(job.x.cpu()),
                attribution=np.ascontiguousarray(att[:, cols], dtype=np.float64),
                seconds=time.perf_counter() - job.submitted,
            )
        except Exception as exc:
            _fail(job, exc)
            return
        if job.future.set_running_or_notify_cancel():
            job.future.set_result(result)


def _guided(job: _Job, eps: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(eps, weights) of a job's n rows: guided from its two branches, or as they came."""
    if job.scale is None:
        return eps, w
    n = job.n
    return guide(eps[:n], eps[n:], job.scale), w[:n]


def _cat_labels(
    labels: Sequence[torch.Tensor | None], sizes: Sequence[int], num_classes: int, device: torch.device
) -> torch.Tensor | None:
    """One label tensor for rows of several requests: unlabelled rows get the null class (what None means to a
    compartment and the router, ``cdm.compartment.class_input``); None when the compartments are unconditional."""
    if num_classes == 0 or all(c is None for c in labels):
        return None
    return torch.cat(
        [
            c.to(device=device, dtype=torch.long)
            if c is not None
            else torch.full((size,), num_classes, dtype=torch.long, device=device)
            for c, size in zip(labels, sizes, strict=True)
        ]
    )


def _timed_out(job: _Job, timeout_s: float) -> SamplerUnavailable:
    return SamplerUnavailable(
        f"the request was not finished within the sampler's {timeout_s:g} s ([serve] sample_timeout_s): the "
        f"server is overloaded (it was at step {job.step} of {len(job.timesteps) or job.request.steps}); retry later "
        "or ask for fewer images or steps",
        retry_after_s=5,
    )


def _fail(job: _Job, exc: BaseException) -> None:
    """Fail a job's future unless its caller already gave up."""
    if job.future.set_running_or_notify_cancel():
        job.future.set_exception(exc)
