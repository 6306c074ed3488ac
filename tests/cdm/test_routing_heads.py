"""The heads routing kind (cdm/routing/heads.py): exact on an analytic Gaussian mixture, trained heads on toy sources.

Analytic: with EXACT heads h_i = log q_i(x_t | c) - log N(x_t; 0, I) and exact component eps, the composition is the
mixture's eps for the full set and every subset, top-k keeps the exact posterior's largest weights, guidance composes
each branch with its own weights, and compartments and heads outside the allowed set are never evaluated.

Trained (``test_trained_heads_recover_the_source_at_moderate_noise``): two well-separated 8x8 toy sources (top half
+0.6, bottom -0.6, and the reverse; pixel noise 0.1; 64 images each), heads = the learnt Router with one output,
channels (8, 16), batch 32 + 32, lr 2e-3, equal priors. Measured (a one-off script, this test's set-up) on 256
noised images per source and t (600 steps, ~16 s for both heads on one CPU thread), against the exact log q_i of
the empirical data:

    t     acc   Bayes acc  |h_a - log-ratio*_a|  |dh - dlog q*|  |dlog q*|  |dh|    |w - w*|
    5     1.000 1.000      69428                 138036          138053     16.3    0.0000
    100   1.000 1.000      755                   1501            1518       16.9    0.0000
    300   1.000 1.000      74.5                  147.6           163.9      16.3    0.0000
    500   1.000 1.000      15.7                  30.7            44.3       13.6    0.0000
    600   1.000 1.000      6.52                  12.9            23.1       10.2    0.0024
    700   0.986 0.992      2.74                  4.85            11.5       6.66    0.0124
    800   0.951 0.945      0.89                  1.71            5.03       3.44    0.0386
    900   0.762 0.793      0.28                  0.45            1.43       1.30    0.0679
    990   0.494 0.506      0.04                  0.05            0.10       0.14    0.0135

Where the ratio breaks down: below t ~ 600 of 1000 (squaredcos schedule) the classifiers saturate. Each head's
logit stays near 16 nats while the true log-ratio to N(0, I) grows to 10^2-10^5 nats (the data are far from N(0, I)
and separable from it by any feature), so the estimated log-ratio between the two sources is wrong by orders of
magnitude. For these separated sources the weights are still right (the saturated difference is >= 10 nats, so
w ~ 1 - 1e-5 where w* ~ 1): the source is recovered at every t < 700 and argmax accuracy is within 0.03 of Bayes
accuracy everywhere. The weight error peaks at t ~ 800-900 (0.04-0.07), where the ratio is estimated
(|dh - dlog q*| of 0.5-1.7 nats) but not exactly. Sources that overlap at low noise (not measured here) would need
the saturated region to carry the distinction, and there the heads carry almost no information.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from torch import nn

from cdm.compartment import CompartmentHead
from cdm.config import ModelConfig, RouterConfig, build, parse_library
from cdm.data import SourceData, to_model_tensor
from cdm.errors import ConfigError, TrainingInterrupted
from cdm.routing import (
    HeadsComposition,
    HeadsRouter,
    build_composition,
    check_kind,
    head_network,
    needs_router,
    serving,
    train_head,
)
from tests.cdm.gaussians import SHAPE, exact_posterior, log_normal, make_sources, mixture_eps

NAMES = ["a", "b", "c"]
PRIORS = [0.5, 0.3, 0.2]
SUBSETS = [list(s) for r in (1, 2, 3) for s in itertools.combinations(range(3), r)]
N = 64


@pytest.fixture(autouse=True)
def restore_torch_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


class ExactHead(nn.Module):
    """h_i(x_t, t, c) = log q_i(x_t | c) - log N(x_t; 0, I), exact; counts calls and keeps the rows it saw."""

    def __init__(self, comp) -> None:
        super().__init__()
        self.comp = comp
        self.calls, self.rows = 0, 0
        self.seen: list[torch.Tensor] = []

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        self.calls += 1
        self.rows += x_t.shape[0]
        self.seen.append(x_t.detach().clone())
        t = torch.as_tensor(t).long().expand(x_t.shape[0])
        ref = log_normal(x_t, torch.zeros_like(x_t), torch.ones(x_t.shape[0], dtype=x_t.dtype))
        return (self.comp.log_marginal(x_t, t, class_labels) - ref)[:, None]

    def reset(self) -> None:
        self.calls, self.rows, self.seen = 0, 0, []


def exact_heads(comps, *, class_priors: torch.Tensor | None = None) -> tuple[list[ExactHead], HeadsRouter]:
    heads = [ExactHead(c) for c in comps]
    return heads, HeadsRouter(heads, NAMES, priors=torch.tensor(PRIORS, dtype=torch.float64), class_priors=class_priors)


def reset(*modules) -> None:
    for m in modules:
        m.reset()


@pytest.fixture()
def mixture():
    comps = make_sources()
    heads, router = exact_heads(comps)
    g = torch.Generator().manual_seed(0)
    x = torch.randn((N, *SHAPE), generator=g, dtype=torch.float64)
    t = torch.randint(0, 1000, (N,), generator=g)
    return comps, heads, router, x, t


@pytest.mark.parametrize("subset", SUBSETS, ids=lambda s: "".join(NAMES[i] for i in s))
def test_exact_heads_give_the_sub_mixture_eps_and_never_evaluate_outside(mixture, subset):
    comps, heads, router, x, t = mixture
    names = [NAMES[i] for i in subset]
    den = HeadsComposition(comps, router, NAMES, vectorize="loop")
    for composed, allowed in ((den, names), (den.configured(subset=names), None)):
        reset(*comps, *heads)
        out = composed.compose(x, t, None, allowed=allowed)
        torch.testing.assert_close(out.eps, mixture_eps(comps, PRIORS, subset, x, t), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(out.weights, exact_posterior(comps, PRIORS, subset, x, t), rtol=1e-9, atol=1e-12)
        for i, (c, h) in enumerate(zip(comps, heads, strict=True)):
            if i in subset:
                assert (c.calls, c.rows, h.calls, h.rows) == (1, N, 1, N)
            else:
                assert c.calls == 0 and h.calls == 0, f"{NAMES[i]} is outside the allowed set but was evaluated"
                assert torch.all(out.weights[:, i] == 0)
    assert isinstance(den.configured(subset=names), HeadsComposition) and den.kind == "heads"


def test_per_row_masks_reach_only_their_heads_and_compartments(mixture):
    comps, heads, router, x, t = mixture
    den = HeadsComposition(comps, router, NAMES, vectorize="loop")
    mask = torch.zeros((N, 3), dtype=torch.bool)
    rows_of = {0: [0, 2], 1: [1], 2: [0, 1, 2]}
    for r in range(N):
        mask[r, rows_of[r % 3]] = True
    out = den.compose(x, t, None, allowed=mask)
    for r_mod, subset in rows_of.items():
        rows = torch.arange(r_mod, N, 3)
        want = mixture_eps(comps, PRIORS, subset, x[rows], t[rows])
        torch.testing.assert_close(out.eps[rows], want, rtol=1e-9, atol=1e-9)
    for i, h in enumerate(heads):
        assert h.calls == 1 and torch.equal(torch.cat(h.seen), x[mask[:, i]]), "a head sees exactly its rows"
        assert torch.equal(torch.cat(comps[i].seen), x[mask[:, i]])


def test_top_1_runs_one_compartment_per_row_the_exact_posteriors_argmax(mixture):
    comps, heads, router, x, t = mixture
    den = HeadsComposition(comps, router, NAMES, mode="top_k", top_k=1, vectorize="loop")
    out = den.compose(x, t, None)
    best = exact_posterior(comps, PRIORS, [0, 1, 2], x, t).argmax(1)
    assert torch.equal(out.weights.argmax(1), best) and torch.all(out.weights.max(1).values == 1)
    assert sum(c.rows for c in comps) == N, "top-1: one compartment pass per row"
    assert all(h.rows == N for h in heads), "every allowed head runs (cheap), once"
    eps = torch.stack([comps[int(b)].exact(x[n : n + 1], t[n : n + 1]) for n, b in enumerate(best)]).squeeze(1)
    torch.testing.assert_close(out.eps, eps, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("scale", [1.0, 3.0])
@pytest.mark.parametrize("subset", [[0, 1, 2], [0, 2]], ids=["abc", "ac"])
def test_guidance_branches_use_their_own_exact_weights_with_class_priors(scale, subset):
    comps = make_sources(classes=2)
    # lambda_i P(c | i): the class priors of the exact joint
    cp = torch.tensor(
        [[p * math.exp(float(lp)) for lp in c.log_pis] for p, c in zip(PRIORS, comps, strict=True)], dtype=torch.float64
    )
    heads, router = exact_heads(comps, class_priors=cp)
    g = torch.Generator().manual_seed(5)
    x = torch.randn((N, *SHAPE), generator=g, dtype=torch.float64)
    t = torch.randint(0, 1000, (N,), generator=g)
    labels = torch.tensor([0, 1, 2] * (N // 3) + [0] * (N % 3))  # 2 = the null class
    den = HeadsComposition(comps, router, NAMES, vectorize="loop")
    out = den.sampler(N, allowed=[NAMES[i] for i in subset], guidance_scale=scale).compose(x, t, labels)
    null = torch.full_like(labels, 2)
    eps_c = mixture_eps(comps, PRIORS, subset, x, t, labels)
    eps_null = mixture_eps(comps, PRIORS, subset, x, t, null)
    torch.testing.assert_close(out.eps, eps_null + scale * (eps_c - eps_null), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out.weights, exact_posterior(comps, PRIORS, subset, x, t, labels), rtol=1e-9, atol=1e-12)
    if scale != 1.0:
        assert out.null_weights is not None
        torch.testing.assert_close(
            out.null_weights, exact_posterior(comps, PRIORS, subset, x, t, null), rtol=1e-9, atol=1e-12
        )
    for i, h in enumerate(heads):
        assert (h.calls > 0) == (i in subset)


def test_a_zero_class_count_means_never_evaluated_on_that_class():
    comps = make_sources(classes=2)
    cp = torch.tensor([[3.0, 1.0], [0.0, 2.0], [1.0, 1.0]])  # b never saw class 0
    heads, router = exact_heads(comps, class_priors=cp)
    x = torch.randn((6, *SHAPE), dtype=torch.float64)
    t = torch.full((6,), 500)
    labels = torch.tensor([0, 0, 0, 1, 2, 2])
    w = HeadsComposition(comps, router, NAMES, vectorize="loop").compose(x, t, labels).weights
    assert torch.all(w[:3, 1] == 0) and torch.all(w[3:, 1] > 0)
    assert heads[1].rows == 3 and comps[1].rows == 3, "head and compartment b run on the 3 rows not of class 0"
    with pytest.raises(ConfigError, match="prior 0 for every source"):
        HeadsComposition(comps, router, NAMES).compose(x[:1], t[:1], labels[:1], allowed=["b"])


# ----------------------------------------------------------------------------------------------------- trained heads

MODEL = ModelConfig(sample_size=8, block_out_channels=(8, 16), norm_num_groups=4, num_classes=0)
ROUTER = RouterConfig(steps=300, batch_size=64, channels=(8, 16), eval_samples=64, threads=1)


def toy(sign: int, seed: int, n: int = 64) -> SourceData:
    rng = np.random.default_rng(seed)
    img = np.zeros((n, 8, 8, 1))
    img[:, :4], img[:, 4:] = 0.6 * sign, -0.6 * sign
    img += rng.normal(0, 0.1, img.shape)
    return SourceData(np.clip((img + 1) / 2 * 255, 0, 255).astype(np.uint8), None, np.arange(n, dtype=np.int64))


def exact_log_q(x0: torch.Tensor, x_t: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """log q(x_t) of the empirical data ``x0`` at one t (abar = alpha-bar_t)."""
    d = x_t[0].numel()
    sq = (x_t.flatten(1)[:, None] - abar.sqrt() * x0.flatten(1)[None]).pow(2).sum(-1)
    return torch.logsumexp(-0.5 * sq / (1 - abar) - 0.5 * d * math.log(2 * math.pi * (1 - abar)), 1) - math.log(len(x0))


def test_trained_heads_recover_the_source_at_moderate_noise(tmp_path):
    sources = {"a": toy(+1, 1), "b": toy(-1, 2)}
    stored = {
        k: train_head(k, d, model=MODEL, router=ROUTER, num_classes=0, progress=False) for k, d in sources.items()
    }
    for k, head in stored.items():
        assert head.doc["source"] == k and head.doc["steps"] == ROUTER.steps
        report = head.doc["report"]["accuracy_by_noise"]
        assert min(report[:5]) > 0.95, f"a head tells its source from N(0, I) at low noise: {report}"
    # the trained heads composed: the Router architecture rebuilt from the stored document
    router = HeadsRouter([head_network(stored[k]) for k in ("a", "b")], ["a", "b"])
    sched = DDPMScheduler(**MODEL.scheduler_config())
    x0 = {k: to_model_tensor(d.images, 8).double() for k, d in sources.items()}
    g = torch.Generator().manual_seed(7)
    for t in (300, 500, 700):
        for y, k in enumerate(("a", "b")):
            x = x0[k][torch.randint(0, 64, (128,), generator=g)]
            tt = torch.full((128,), t)
            x_t = sched.add_noise(x, torch.randn(x.shape, generator=g, dtype=torch.float64), tt)
            with torch.no_grad():
                h = router(x_t.float(), tt, None).double()
            acc = float((h.argmax(1) == y).double().mean())
            assert acc >= 0.95, f"t = {t}: the heads picked source {k} for only {acc:.2f} of its images"
            if t == 300:  # saturated: the true log-ratio between the sources is ~160 nats, the heads say ~16
                abar = sched.alphas_cumprod[t].double()
                true = (exact_log_q(x0["a"], x_t, abar) - exact_log_q(x0["b"], x_t, abar)).abs().mean()
                got = (h[:, 0] - h[:, 1]).abs().mean()
                assert got < true / 4, f"expected saturation at t = {t}: |dh| {got:.1f} vs |dlog q| {true:.1f}"


def test_a_trained_head_resumes_from_its_checkpoint(tmp_path):
    data = toy(+1, 1, n=16)
    cfg = build(RouterConfig, {"steps": 6, "checkpoint_every": 2, "batch_size": 8, "channels": [8, 16], "threads": 1})
    whole = train_head("a", data, model=MODEL, router=cfg, num_classes=0, progress=False)
    calls = {"n": 0}

    def stop() -> bool:
        calls["n"] += 1
        return calls["n"] > 3

    with pytest.raises(TrainingInterrupted):
        train_head(
            "a", data, model=MODEL, router=cfg, num_classes=0, progress=False, should_stop=stop, workdir=tmp_path
        )
    resumed = train_head("a", data, model=MODEL, router=cfg, num_classes=0, progress=False, workdir=tmp_path)
    for key, value in whole.state.items():
        torch.testing.assert_close(resumed.state[key], value, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------- kinds


def test_the_heads_kind_is_a_kind_that_needs_no_router_and_serves_compartments_with_heads():
    assert check_kind("heads") == "heads" and not needs_router("heads")
    assert parse_library({"router": {"kind": "heads"}}).router.kind == "heads"
    with pytest.raises(ConfigError, match="kind"):
        parse_library({"router": {"kind": "hydra"}})
    with pytest.raises(ConfigError, match="not one of"):
        check_kind("hydra")
    assert serving("heads", ["a@v1", "b@v1"], ["b@v1"]) == (("b@v1",), ("a@v1",))
    assert serving("heads", ["a@v1", "b@v1"], None) == (("a@v1", "b@v1"), ())


def test_build_composition_heads_needs_heads_and_refuses_a_router_or_pruning():
    comps = make_sources()[:2]
    with pytest.raises(ConfigError, match="has no router head"):
        build_composition("heads", comps, ["a", "b"])
    tiny = build(RouterConfig, {"steps": 1, "batch_size": 4, "channels": [8, 16], "threads": 1})
    net = head_network(train_head("a", toy(+1, 1, n=8), model=MODEL, router=tiny, num_classes=0, progress=False))
    with pytest.raises(ConfigError, match="uses no router"):
        build_composition("heads", comps, ["a", "b"], router=net)
    with pytest.raises(ConfigError, match="HeadsRouter"):
        HeadsComposition(comps, net, ["a", "b"])
    with pytest.raises(ConfigError, match="no 'network'"):
        head_network(CompartmentHead({}, {}))
