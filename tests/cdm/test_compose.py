"""Composition is exact: with analytic Gaussian-mixture compartments the composed eps is the mixture's eps."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler
from torch import nn

from cdm.compose import ComposedDenoiser, renormalised_weights, top_k_weights
from cdm.errors import ConfigError

SHAPE = (1, 4, 4)
D = 16
ABAR = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2").alphas_cumprod.double()


class GaussianCompartment(nn.Module):
    """Exact eps for x_0 ~ N(mu, s^2 I): E[eps | x_t] = sqrt(1-a) (x_t - sqrt(a) mu) / (a s^2 + 1 - a)."""

    def __init__(self, mu: torch.Tensor, s: float) -> None:
        super().__init__()
        self.register_buffer("mu", mu)
        self.s = s
        self.calls = 0
        self.rows = 0

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        self.calls += 1
        self.rows += x_t.shape[0]
        a = ABAR[t].view(-1, 1, 1, 1).to(x_t.dtype)
        return (1 - a).sqrt() * (x_t - a.sqrt() * self.mu) / (a * self.s**2 + 1 - a)


def log_normal(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    d = x.flatten(1).shape[1]
    return -0.5 * ((x - mean) ** 2).flatten(1).sum(1) / var - 0.5 * d * torch.log(2 * math.pi * var)


class GaussianRouter(nn.Module):
    """Exact posterior logits log lambda_i + log N(x_t; sqrt(a) mu_i, (a s_i^2 + 1 - a) I)."""

    def __init__(self, comps: list[GaussianCompartment], priors: list[float], names: list[str]) -> None:
        super().__init__()
        self.comps = comps
        self.log_priors = torch.log(torch.tensor(priors, dtype=torch.float64))
        self.source_names = names

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        a = ABAR[t].to(x_t.dtype)
        cols = [
            lp + log_normal(x_t, a.sqrt().view(-1, 1, 1, 1) * c.mu, a * c.s**2 + 1 - a)
            for lp, c in zip(self.log_priors, self.comps, strict=True)
        ]
        return torch.stack(cols, dim=1)


def mixture_eps(x_t: torch.Tensor, t: torch.Tensor, comps, priors) -> torch.Tensor:
    """eps* = -sqrt(1-a) grad log p(x_t) of the true mixture, by autograd."""
    x = x_t.clone().requires_grad_(True)
    a = ABAR[t]
    logs = torch.stack(
        [
            math.log(p) + log_normal(x, a.sqrt().view(-1, 1, 1, 1) * c.mu, a * c.s**2 + 1 - a)
            for p, c in zip(priors, comps, strict=True)
        ],
        dim=1,
    )
    (grad,) = torch.autograd.grad(torch.logsumexp(logs, 1).sum(), x)
    return -(1 - a).sqrt().view(-1, 1, 1, 1) * grad


@pytest.fixture()
def mixture():
    g = torch.Generator().manual_seed(0)
    comps = [
        GaussianCompartment(torch.randn(SHAPE, generator=g, dtype=torch.float64) * 1.5, s) for s in (0.3, 0.6, 1.0)
    ]
    priors = [0.5, 0.3, 0.2]
    names = ["a", "b", "c"]
    router = GaussianRouter(comps, priors, names)
    x = torch.randn((64, *SHAPE), generator=g, dtype=torch.float64)
    t = torch.randint(0, 1000, (64,), generator=g)
    return comps, priors, names, router, x, t


def test_full_composition_equals_true_mixture_eps(mixture):
    comps, priors, names, router, x, t = mixture
    composed = ComposedDenoiser(comps, router, names, vectorize="loop")
    got = composed(x, t, None)
    want = mixture_eps(x, t, comps, priors)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_subset_composition_equals_sub_mixture_eps(mixture):
    comps, priors, names, router, x, t = mixture
    composed = ComposedDenoiser(comps, router, names, subset=["a", "c"], vectorize="loop")
    got = composed(x, t, None)
    # the sub-mixture of a and c with priors renormalised over S
    z = priors[0] + priors[2]
    want = mixture_eps(x, t, [comps[0], comps[2]], [priors[0] / z, priors[2] / z])
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert comps[1].calls == 0, "a compartment outside the access subset was evaluated"
    w = composed.last_weights
    assert w is not None and torch.all(w[:, 1] == 0)
    torch.testing.assert_close(w.sum(1), torch.ones(64, dtype=w.dtype))


def test_weights_approach_priors_at_high_noise(mixture):
    comps, priors, names, router, x, _ = mixture
    composed = ComposedDenoiser(comps, router, names)
    w = composed.weights(x, torch.full((64,), 999), None)
    # at t = T the marginals of all sources are ~N(0, I): the posterior is the prior
    torch.testing.assert_close(w.mean(0), torch.tensor(priors, dtype=w.dtype), atol=0.02, rtol=0)


def test_top_k_with_k_equal_K_is_full(mixture):
    comps, _, names, router, x, t = mixture
    full = ComposedDenoiser(comps, router, names)(x, t, None)
    topk = ComposedDenoiser(comps, router, names, mode="top_k", top_k=3)(x, t, None)
    torch.testing.assert_close(full, topk)


def test_top_1_routes_each_sample_to_exactly_one_compartment(mixture):
    comps, _, names, router, x, t = mixture
    den = ComposedDenoiser(comps, router, names, mode="top_k", top_k=1)
    eps = den(x, t, None)
    w = den.last_weights
    assert w is not None
    assert torch.all((w > 0).sum(1) == 1)
    # grouped: each compartment ran at most once, on exactly the rows that chose it, 64 rows in total
    assert all(c.calls <= 1 for c in comps)
    assert sum(c.rows for c in comps) == 64
    chosen = w.argmax(1)
    for i, c in enumerate(comps):
        rows = (chosen == i).nonzero(as_tuple=True)[0]
        if len(rows):
            torch.testing.assert_close(eps[rows], c(x[rows], t[rows]))


def test_weight_helpers():
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    w = renormalised_weights(logits, [0, 2])
    assert w[0, 1] == 0 and math.isclose(float(w.sum()), 1.0, rel_tol=1e-6)
    p = torch.softmax(logits, 1)[0]
    assert math.isclose(float(w[0, 0]), float(p[0] / (p[0] + p[2])), rel_tol=1e-6)
    t = top_k_weights(torch.tensor([[0.2, 0.5, 0.3]]), 2)
    torch.testing.assert_close(t, torch.tensor([[0.0, 0.625, 0.375]]))


def test_bad_options_are_rejected(mixture):
    comps, _, names, router, _, _ = mixture
    with pytest.raises(ConfigError, match="unknown source"):
        ComposedDenoiser(comps, router, names, subset=["zzz"])
    with pytest.raises(ConfigError, match="empty"):
        ComposedDenoiser(comps, router, names, subset=[])
    with pytest.raises(ConfigError, match="top_k"):
        ComposedDenoiser(comps, router, names, mode="top_k", top_k=0)
    with pytest.raises(ConfigError, match="router was not trained"):
        ComposedDenoiser(comps, router, ["a", "b", "x"])


def test_vectorised_and_loop_evaluation_agree() -> None:
    from cdm.compartment import Compartment, build_unet, new_manifest
    from cdm.config import TrainConfig
    from tests.cdm.conftest import TINY_MODEL

    torch.manual_seed(0)
    names = ["a", "b", "c"]
    comps = [
        Compartment(
            build_unet(TINY_MODEL, 10).eval(),
            new_manifest(
                n, fingerprint="-", n_samples=1, class_counts=[], num_classes=10, model=TINY_MODEL, train=TrainConfig()
            ),
        )
        for n in names
    ]

    class Logits(nn.Module):
        source_names = names

        def forward(self, x, t, c):
            return x.flatten(1)[:, :3] * 3.0

    g = torch.Generator().manual_seed(1)
    x = torch.randn((7, 1, 8, 8), generator=g)
    t = torch.randint(0, 1000, (7,), generator=g)
    c = torch.tensor([0, 1, 2, 10, 4, 5, 6])
    loop = ComposedDenoiser(comps, Logits(), names, vectorize="loop")
    vmap = loop.configured(vectorize="vmap")
    with torch.no_grad():
        torch.testing.assert_close(loop(x, t, c), vmap(x, t, c), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(loop(x, t, None), vmap(x, t, None), rtol=1e-4, atol=1e-5)
        sub = loop.configured(subset=["a", "c"])
        torch.testing.assert_close(sub(x, t, c), sub.configured(vectorize="vmap")(x, t, c), rtol=1e-4, atol=1e-5)
