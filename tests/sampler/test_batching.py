"""The cross-request batcher (sampler/batching.py) on tiny trained compartments of both routing kinds.

A request's result never depends on what else is in the batch: the same seed gives the images and attribution of
``sample_now`` (one pipeline call for that request alone), for mixed subsets, labels, top k, steps, schedulers and
guidance. In float64 the two agree to rounding (the batcher does the same arithmetic on a larger batch); in float32
a convolution over a larger batch may round differently, and the density kind's finite-difference divergence
amplifies that, so float32 is checked to a float32 tolerance. Compartments are counted: one call per compartment per
engine iteration, never on a row whose request may not use it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import itertools
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import numpy as np
import pytest
import torch

from cdm.compartment import Compartment
from cdm.config import ModelConfig, RouterConfig, TrainConfig
from cdm.errors import ConfigError
from cdm.routing import build_composition, train_router
from cdm.training import train_compartment
from sampler.batching import BatchingSampler, Iteration
from sampler.engine import SampleRequest, SampleResult, sample_now
from sampler.errors import SamplerUnavailable
from sampler.live import Composition
from tests.daemon.daemon_harness import digit_sources

MODEL = ModelConfig(sample_size=8, block_out_channels=(16, 32))
TRAIN = TrainConfig(steps=3, batch_size=16, warmup_steps=1, checkpoint_every=0)
ROUTER = RouterConfig(steps=5, batch_size=32, channels=(16, 32), eval_samples=32)
NAMES = ("alpha", "beta", "gamma")
TIMEOUT = 120  # seconds any one future may take in these tests


@dataclass(frozen=True)
class Parts:
    compartments: list[Compartment]
    router: torch.nn.Module
    n_samples: list[int]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread: the engine thread computes while the main thread's OpenMP team (from training and
    ``sample_now`` here) is alive, and two teams on 2 cores measured 2-4x slower than one thread each."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def parts() -> Parts:
    torch.manual_seed(0)
    data = dict(zip(NAMES, digit_sources(len(NAMES)).values(), strict=True))
    comps = []
    for name, d in data.items():
        res = train_compartment(name, d, model=MODEL, train=TRAIN, num_classes=10, progress=False)
        assert res.compartment is not None
        comps.append(res.compartment.eval())
    rr = train_router(data, model=MODEL, router=ROUTER, num_classes=10, progress=False)
    return Parts(comps, rr.router.eval(), [len(d) for d in data.values()])


@pytest.fixture(scope="module")
def parts64(parts: Parts) -> Parts:
    """The same compartments and router in float64."""
    return Parts(
        [copy.deepcopy(c).double() for c in parts.compartments], copy.deepcopy(parts.router).double(), parts.n_samples
    )


@pytest.fixture
def float64() -> Iterator[None]:
    """float64 as torch's default dtype (the initial noise and the schedulers' tensors follow it)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


@dataclass
class Counted:
    """Compartment calls seen by forward pre-hooks: per call (source, input rows)."""

    calls: list[tuple[str, torch.Tensor]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self) -> list[tuple[str, torch.Tensor]]:
        with self.lock:
            out, self.calls = self.calls, []
        return out


@pytest.fixture
def counted(parts: Parts) -> Iterator[Counted]:
    box = Counted()
    handles = [
        c.register_forward_pre_hook(lambda _m, args, name=name: box.calls.append((name, args[0].detach().clone())))
        for name, c in zip(NAMES, parts.compartments, strict=True)
    ]
    yield box
    for h in handles:
        h.remove()


def composition(parts: Parts, kind: str, epoch: int = 1, names: tuple[str, ...] = NAMES) -> Composition:
    idx = [NAMES.index(n) for n in names]
    den = build_composition(
        kind,
        [parts.compartments[i] for i in idx],
        list(names),
        router=parts.router if kind == "learnt" else None,
        router_names=list(NAMES) if kind == "learnt" else None,
        n_samples=[parts.n_samples[i] for i in idx] if kind == "density" else None,
        vectorize="loop",
    )
    return Composition(epoch=epoch, denoiser=den, compartment_ids=tuple(f"{n}@v1" for n in names), sources=names)


def req(comp: Composition, sources: tuple[str, ...], **kw: object) -> SampleRequest:
    base: dict[str, object] = {"n": 2, "steps": 4, "scheduler": "ddpm", "seed": 0}
    base.update(kw)
    return SampleRequest(composition=comp, sources=sources, **base)  # type: ignore[arg-type]


def assert_same(batched: SampleResult, alone: SampleResult, *, atol: float = 1e-5) -> None:
    """Equal within float tolerance: uint8 pixels at most 1 apart (rounding), attribution to ``atol``."""
    assert batched.epoch == alone.epoch and batched.sources == alone.sources
    assert batched.images.shape == alone.images.shape and batched.images.dtype == np.uint8
    diff = np.abs(batched.images.astype(int) - alone.images.astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.05, (diff.max(), diff.mean())
    assert batched.attribution.shape == (alone.images.shape[0], len(alone.sources))
    np.testing.assert_allclose(batched.attribution, alone.attribution, rtol=0, atol=atol)


def run_all(sampler: BatchingSampler, requests: list[SampleRequest]) -> list[SampleResult]:
    futures = [sampler.submit(r) for r in requests]
    return [f.result(TIMEOUT) for f in futures]


def mixed_learnt(comp: Composition) -> list[SampleRequest]:
    return [
        req(comp, ("alpha", "beta", "gamma"), n=3, seed=1),
        req(comp, ("beta",), n=1, seed=2, labels=(4,)),
        req(comp, ("alpha", "gamma"), n=2, seed=3, top_k=1, labels=(0, 9)),
        req(comp, ("alpha", "beta"), n=2, seed=4, steps=6, scheduler="ddim"),
        req(comp, ("gamma", "beta"), n=1, seed=5, steps=3, scheduler="dpm", top_k=2),
        req(comp, ("alpha", "beta", "gamma"), n=2, seed=6, labels=(1, 7), guidance_scale=3.0),
        req(comp, ("beta", "gamma"), n=1, seed=7, labels=(5,), guidance_scale=2.0, scheduler="dpm", steps=5, top_k=1),
        req(comp, ("alpha",), n=2, seed=8, guidance_scale=4.0),  # no labels: guidance is a no-op
    ]


def mixed_density(comp: Composition) -> list[SampleRequest]:
    return [
        req(comp, ("alpha", "beta", "gamma"), n=3, seed=1),
        req(comp, ("beta",), n=1, seed=2, labels=(4,)),
        req(comp, ("alpha", "gamma"), n=2, seed=3, labels=(0, 9), scheduler="ddim", steps=5),  # divergence estimator
        req(comp, ("alpha", "beta"), n=2, seed=4, steps=6, scheduler="dpm"),
        req(comp, ("alpha", "beta", "gamma"), n=2, seed=6, labels=(1, 7), guidance_scale=3.0),
        req(comp, ("beta", "gamma"), n=1, seed=7, labels=(5,), guidance_scale=2.0, scheduler="ddim", steps=3),
    ]


def check_equal_to_alone(requests: list[SampleRequest], *, atol: float, exact: bool) -> None:
    """Every request batched with all the others == ``sample_now`` of it alone, and they really shared iterations."""
    seen: list[Iteration] = []
    sampler = BatchingSampler(max_batch_rows=256, max_wait_s=0.5, on_iteration=seen.append)
    try:
        results = run_all(sampler, requests)
    finally:
        sampler.close()
    for r, got in zip(requests, results, strict=True):
        alone = sample_now(r)
        assert_same(got, alone, atol=atol)
        if exact:
            assert np.array_equal(got.images, alone.images), r
        assert np.allclose(got.attribution.sum(1), 1.0, atol=1e-5)
    # they really ran together: the first iteration held every request (different steps, schedulers, masks)
    assert len(seen[0].requests) == len(requests)
    assert seen[0].rows == sum(r.n * (2 if r.labels and r.guidance_scale != 1 else 1) for r in requests)
    assert len(seen) == max(r.steps for r in requests)


@pytest.mark.parametrize("kind", ["learnt", "density"])
@pytest.mark.usefixtures("float64")
def test_batched_results_equal_per_request_results_in_float64(parts64: Parts, kind: str) -> None:
    comp = composition(parts64, kind)
    requests = mixed_learnt(comp) if kind == "learnt" else mixed_density(comp)
    check_equal_to_alone(requests, atol=1e-9, exact=True)


@pytest.mark.parametrize("kind", ["learnt", "density"])
def test_batched_results_equal_per_request_results_in_float32(parts: Parts, kind: str) -> None:
    comp = composition(parts, kind)
    requests = mixed_learnt(comp) if kind == "learnt" else mixed_density(comp)
    # density: the weights integrate eps differences over the trajectory (divided by the divergence's fd step)
    check_equal_to_alone(requests, atol=1e-5 if kind == "learnt" else 2e-3, exact=False)


@pytest.mark.parametrize("kind", ["learnt", "density"])
def test_compartments_run_once_per_iteration_and_only_on_allowed_rows(
    parts: Parts, counted: Counted, kind: str
) -> None:
    comp = composition(parts, kind)
    # DDPM / Itô for density: no divergence probe rows, so every row a compartment sees is a model input row
    requests = [
        req(comp, ("alpha",), n=2, seed=11),
        req(comp, ("beta", "gamma"), n=3, seed=12, labels=(2,), guidance_scale=2.0),
        req(comp, ("alpha", "gamma"), n=1, seed=13, steps=6),
        req(comp, ("gamma",), n=2, seed=14, steps=2),
    ]
    checked: list[int] = []
    problems: list[str] = []

    def check(it: Iteration) -> None:
        calls = counted.take()
        names = [name for name, _ in calls]
        if len(names) != len(set(names)):
            problems.append(f"a compartment ran twice in one iteration: {names}")
        rows = torch.cat(list(it.inputs)).flatten(1)
        for name, x in calls:
            for row in x.flatten(1):
                match = (rows == row).all(1).nonzero(as_tuple=True)[0]
                if match.numel() == 0:
                    problems.append(f"{name} saw a row that is no request's input")
                    continue
                owner = it.requests[it.owners[int(match[0])]]
                if name not in owner.sources:
                    problems.append(f"{name} saw a row of a request that may use only {owner.sources}")
        # every allowed (row, compartment) pair ran: a compartment's rows are exactly those allowed to use it
        for name in NAMES:
            want = sum(r.n * (2 if r.labels and r.guidance_scale != 1 else 1) for r in it.requests if name in r.sources)
            got = sum(x.shape[0] for n, x in calls if n == name)
            if want != got and not (kind == "learnt" and got < want):  # learnt top-k may drop rows, full does not
                problems.append(f"{name} ran on {got} rows, {want} may use it")
        checked.append(len(calls))

    sampler = BatchingSampler(max_batch_rows=256, max_wait_s=0.5, on_iteration=check)
    try:
        run_all(sampler, requests)
    finally:
        sampler.close()
    assert not problems, problems[:5]
    # 6 iterations (the longest request); the last two hold only the alpha+gamma request
    assert len(checked) == 6 and max(checked) <= 3 and checked[-1] <= 2, checked
    if kind == "density":
        assert checked == [3, 3, 3, 3, 2, 2]


def test_many_threads_submitting(parts: Parts) -> None:
    comp = composition(parts, "learnt")
    subsets = [("alpha",), ("beta",), ("gamma",), ("alpha", "beta"), ("beta", "gamma"), ("alpha", "beta", "gamma")]
    requests = [
        req(
            comp,
            subsets[i % len(subsets)],
            n=1 + i % 3,
            seed=100 + i,
            steps=2 + i % 4,
            top_k=(1 if i % 5 == 0 else None),
        )
        for i in range(32)
    ]
    seen: list[Iteration] = []
    sampler = BatchingSampler(max_batch_rows=24, max_wait_s=0.002, on_iteration=seen.append)
    results: dict[int, SampleResult] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(16)

    def client(k: int) -> None:
        barrier.wait()
        for i in range(k, len(requests), 16):
            try:
                results[i] = sampler.submit(requests[i]).result(TIMEOUT)
            except BaseException as exc:  # collected and asserted below
                errors.append(exc)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    sampler.close()
    assert not errors and len(results) == len(requests)
    for i, r in enumerate(requests):
        assert_same(results[i], sample_now(r))
    assert max(it.rows for it in seen) <= 24, "the row cap holds"
    assert max(len(it.requests) for it in seen) > 4, "concurrent requests were batched"


def test_the_row_cap_and_a_request_larger_than_it(parts: Parts) -> None:
    comp = composition(parts, "learnt")
    seen: list[Iteration] = []
    sampler = BatchingSampler(max_batch_rows=4, max_wait_s=0.3, on_iteration=seen.append)
    big = req(comp, ("alpha", "beta"), n=6, seed=1, steps=2)
    small = [req(comp, ("beta",), n=2, seed=2 + i, steps=2) for i in range(3)]
    try:
        results = run_all(sampler, [*small, big])
    finally:
        sampler.close()
    for r, got in zip([*small, big], results, strict=True):
        assert_same(got, sample_now(r))
    for it in seen:
        assert it.rows <= 4 or (len(it.requests) == 1 and it.requests[0] is big), (it.rows, len(it.requests))
    assert any(it.requests == (big,) for it in seen), "the oversized request ran alone"


def test_a_hot_swap_mid_request_keeps_each_request_on_its_composition(parts: Parts, counted: Counted) -> None:
    old = composition(parts, "learnt", epoch=1)
    new = composition(parts, "learnt", epoch=2, names=("alpha", "gamma"))  # beta forgotten; same compartment objects
    seen: list[Iteration] = []
    problems: list[str] = []
    started = threading.Event()

    def on_iteration(it: Iteration) -> None:
        seen.append(it)
        epochs = {r.composition.epoch for r in it.requests}
        if epochs != {it.epoch}:
            problems.append(f"an iteration mixed epochs {epochs}")
        names = [n for n, _ in counted.take()]
        if len(names) != len(set(names)):
            problems.append(f"a compartment ran twice in one iteration: {names}")
        started.set()

    sampler = BatchingSampler(max_batch_rows=64, max_wait_s=0.0, on_iteration=on_iteration)
    try:
        first = [req(old, NAMES, n=2, seed=1, steps=12), req(old, ("beta",), n=1, seed=2, steps=10)]
        futures = [sampler.submit(r) for r in first]
        assert started.wait(TIMEOUT)
        second = [req(new, ("alpha", "gamma"), n=2, seed=3, steps=5), req(new, ("gamma",), n=1, seed=4, steps=3)]
        futures += [sampler.submit(r) for r in second]
        results = [f.result(TIMEOUT) for f in futures]
    finally:
        sampler.close()
    assert not problems, problems[:5]
    for r, got in zip(first + second, results, strict=True):
        assert_same(got, sample_now(r))
        assert got.epoch == r.composition.epoch
    assert [res.epoch for res in results] == [1, 1, 2, 2] and "beta" not in results[2].sources + results[3].sources
    assert {it.epoch for it in seen} == {1, 2}
    # both compositions were in flight at once: their iterations took turns
    order = [it.epoch for it in seen]
    assert any(a != b for a, b in itertools.pairwise(order)) and order.count(2) == 5


def test_cancelled_and_timed_out_requests_drop_out_and_others_finish(parts: Parts) -> None:
    comp = composition(parts, "learnt")
    seen: list[Iteration] = []
    step = threading.Event()

    def on_iteration(it: Iteration) -> None:
        seen.append(it)
        step.set()
        time.sleep(0.01)  # slow iterations so a cancel lands mid-request

    sampler = BatchingSampler(max_batch_rows=64, max_wait_s=0.2, on_iteration=on_iteration)
    try:
        doomed = req(comp, NAMES, n=2, seed=1, steps=200)
        kept = req(comp, ("alpha",), n=1, seed=2, steps=30)
        f_doomed, f_kept = sampler.submit(doomed), sampler.submit(kept)
        assert step.wait(TIMEOUT)
        assert f_doomed.cancel(), "a running request's future can be cancelled"
        assert_same(f_kept.result(TIMEOUT), sample_now(kept))
        at_cancel = next(i for i, it in enumerate(seen) if doomed not in it.requests)
        assert at_cancel < 10 and all(doomed not in it.requests for it in seen[at_cancel:])

        # an asyncio caller that stops waiting (a timeout, a client that went away) cancels its request too
        async def impatient() -> None:
            await asyncio.wait_for(sampler.sample(req(comp, ("beta",), n=1, seed=3, steps=200)), 0.3)

        n_before = len(seen)
        with pytest.raises(asyncio.TimeoutError):
            asyncio.run(impatient())
        deadline = time.monotonic() + 10
        while sampler.running and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(seen) - n_before < 100, "the abandoned request was dropped, not run to its 200 steps"
    finally:
        sampler.close()
    # the sampler's own timeout: 503-style SamplerUnavailable, the engine goes on with the others
    quick = BatchingSampler(max_batch_rows=64, max_wait_s=0.0, timeout_s=1.0, on_iteration=lambda it: time.sleep(0.02))
    try:
        slow = quick.submit(req(comp, NAMES, n=1, seed=4, steps=1000))
        with pytest.raises(SamplerUnavailable, match="not finished within"):
            slow.result(TIMEOUT)
        fine = req(comp, ("gamma",), n=1, seed=5, steps=2)
        assert_same(quick.submit(fine).result(TIMEOUT), sample_now(fine))
    finally:
        quick.close()


def test_a_bad_request_fails_alone(parts: Parts) -> None:
    comp = composition(parts, "density")
    sampler = BatchingSampler(max_batch_rows=64, max_wait_s=0.3)
    try:
        good = req(comp, ("alpha", "beta"), n=1, seed=1)
        bad_top_k = req(comp, ("alpha",), n=1, seed=2, top_k=1)  # density routing has no top k
        bad_scheduler = req(comp, ("beta",), n=1, seed=3, scheduler="euler")
        futures = [sampler.submit(r) for r in (good, bad_top_k, bad_scheduler)]
        assert_same(futures[0].result(TIMEOUT), sample_now(good))
        with pytest.raises(ConfigError, match="does not apply to density routing"):
            futures[1].result(TIMEOUT)
        with pytest.raises(ConfigError, match="unknown scheduler"):
            futures[2].result(TIMEOUT)
    finally:
        sampler.close()


def test_close_fails_waiting_requests_and_the_engine_stops_when_idle(parts: Parts) -> None:
    comp = composition(parts, "learnt")
    sampler = BatchingSampler(max_batch_rows=64, max_wait_s=0.0, idle_exit_s=0.2)
    r = req(comp, ("alpha",), n=1, seed=1, steps=2)
    assert not sampler.running
    sampler.submit(r).result(TIMEOUT)
    deadline = time.monotonic() + 10
    while sampler.running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not sampler.running, "an idle engine thread exits"
    assert_same(sampler.submit(r).result(TIMEOUT), sample_now(r))  # the next request starts it again
    gate = threading.Event()

    def hold(_: Iteration) -> None:
        gate.wait(10)

    slow = BatchingSampler(max_batch_rows=1, max_wait_s=0.0, on_iteration=hold)
    running = slow.submit(req(comp, ("alpha",), n=1, seed=2, steps=50))
    queued = slow.submit(req(comp, ("beta",), n=1, seed=3, steps=2))  # over the row cap: waits in the queue
    closer = threading.Thread(target=slow.close)
    closer.start()
    gate.set()
    closer.join(TIMEOUT)
    for f in (running, queued):
        with pytest.raises(SamplerUnavailable, match="shutting down"):
            f.result(TIMEOUT)
    with pytest.raises(SamplerUnavailable):
        slow.submit(r)
    sampler.close()


def test_results_do_not_depend_on_batch_company(parts: Parts) -> None:
    """The same request alone, and among others joining at different iterations: the same result."""
    comp = composition(parts, "learnt")
    probe = req(comp, ("alpha", "beta"), n=2, seed=42, steps=8, labels=(3, 8), guidance_scale=2.0)
    alone = BatchingSampler(max_wait_s=0.0)
    crowd = BatchingSampler(max_wait_s=0.0, on_iteration=lambda it: time.sleep(0.005))
    try:
        a = alone.submit(probe).result(TIMEOUT)
        futures: list[concurrent.futures.Future[SampleResult]] = [crowd.submit(replace(probe, seed=7))]
        time.sleep(0.02)
        futures.append(crowd.submit(probe))
        time.sleep(0.02)
        futures.append(crowd.submit(replace(probe, sources=("gamma",), seed=8)))
        b = futures[1].result(TIMEOUT)
        for f in futures:
            f.result(TIMEOUT)
    finally:
        alone.close()
        crowd.close()
    assert_same(a, b)
    assert_same(a, sample_now(probe))


def test_close_ends_an_idle_engine_thread_at_once(parts: Parts) -> None:
    comp = composition(parts, "learnt")
    sampler = BatchingSampler(max_wait_s=0.0, idle_exit_s=600.0)  # it would idle for 10 minutes
    sampler.submit(req(comp, ("alpha",), n=1, seed=1, steps=1)).result(TIMEOUT)
    assert sampler.running
    started = time.monotonic()
    sampler.close(timeout=30)
    assert not sampler.running and time.monotonic() - started < 5
