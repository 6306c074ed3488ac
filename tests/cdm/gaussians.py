"""Analytic Gaussian-mixture compartments: exact eps, exact noised marginals, exact posteriors (float64).

Source i, class c: x_0 ~ N(mu_{i,c}, s_i^2 I) with P(c | i) = pi_{i,c}; its class-marginal (the null class) is the
mixture sum_c pi_{i,c} N(mu_{i,c}, s_i^2 I). Under the VP schedule x_t ~ N(sqrt(a) mu, (a s^2 + 1 - a) I) for each
Gaussian, so every eps, log-density and posterior has a closed form. With one class these are the plain Gaussian
sources of the original composition test.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from types import SimpleNamespace

import torch
from diffusers import DDPMScheduler
from torch import nn

SHAPE = (1, 4, 4)
ABAR = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2").alphas_cumprod.double()


def log_normal(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, var I) per row; ``var`` (N,)."""
    d = x.flatten(1).shape[1]
    return -0.5 * ((x - mean) ** 2).flatten(1).sum(1) / var - 0.5 * d * torch.log(2 * math.pi * var)


class GaussianSource(nn.Module):
    """A compartment with exact eps. ``mus`` (C, *SHAPE): one mean per class; ``pis`` (C,) P(c | source).

    Labels: c in [0, C) the class-conditional Gaussian, ``C`` (or None) the null class (the class mixture). Counts
    its calls and rows, and keeps the rows it saw (``seen``) so tests can prove which rows reached it.
    """

    def __init__(self, mus: torch.Tensor, s: float, pis: Sequence[float] | None = None) -> None:
        super().__init__()
        self.register_buffer("mus", mus)
        self.s = s
        self.log_pis = torch.log(torch.tensor(pis if pis is not None else [1.0], dtype=torch.float64))
        self.num_classes = len(self.log_pis) if len(self.log_pis) > 1 else 0
        self.unet = SimpleNamespace(config=SimpleNamespace(in_channels=SHAPE[0], sample_size=SHAPE[1]))
        self.calls = 0
        self.rows = 0
        self.seen: list[torch.Tensor] = []

    def _moments(self, t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        a = ABAR[t].to(dtype)
        return a, a * self.s**2 + 1 - a

    def log_class_densities(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """(N, C) log pi_c + log N(x_t; sqrt(a) mu_c, v)."""
        a, v = self._moments(t, x_t.dtype)
        cols = [
            lp + log_normal(x_t, a.sqrt().view(-1, 1, 1, 1) * mu, v)
            for lp, mu in zip(self.log_pis, self.mus, strict=True)
        ]
        return torch.stack(cols, 1)

    def log_marginal(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """log q(x_t | y) per row: the class Gaussian for a label, the class mixture for the null class."""
        logs = self.log_class_densities(x_t, t)
        null = torch.logsumexp(logs, 1)
        if labels is None or self.num_classes == 0:
            return null
        c = labels.clamp(max=logs.shape[1] - 1)
        labelled = logs.gather(1, c[:, None])[:, 0] - self.log_pis[c]
        return torch.where(labels < self.num_classes, labelled, null)

    def exact(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """The exact eps, without counting a call."""
        t = torch.as_tensor(t).long().expand(x_t.shape[0])
        a, v = self._moments(t, x_t.dtype)
        sig = (1 - a).sqrt().view(-1, 1, 1, 1)
        per_class = torch.stack(
            [sig * (x_t - a.sqrt().view(-1, 1, 1, 1) * mu) / v.view(-1, 1, 1, 1) for mu in self.mus], 1
        )  # (N, C, ...)
        post = torch.softmax(self.log_class_densities(x_t, t), 1)  # P(c | x_t, source)
        null = torch.einsum("nc,nc...->n...", post, per_class)
        if labels is None or self.num_classes == 0:
            return null
        c = labels.clamp(max=len(self.mus) - 1)
        chosen = per_class[torch.arange(x_t.shape[0]), c]
        return torch.where((labels < self.num_classes).view(-1, 1, 1, 1), chosen, null)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        self.calls += 1
        self.rows += x_t.shape[0]
        self.seen.append(x_t.detach().clone())
        return self.exact(x_t, t, class_labels)

    def reset(self) -> None:
        self.calls, self.rows, self.seen = 0, 0, []


class ExactRouter(nn.Module):
    """Exact posterior logits: log lambda_i + log P(y | i) + log q_i(x_t | y) (log lambda_i + log q_i(x_t) for null)."""

    def __init__(self, comps: Sequence[GaussianSource], priors: Sequence[float], names: Sequence[str]) -> None:
        super().__init__()
        self.comps = list(comps)
        self.log_priors = torch.log(torch.tensor(priors, dtype=torch.float64))
        self.source_names = list(names)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        return exact_log_joint(self.comps, self.log_priors.exp().tolist(), x_t, t, class_labels)


def exact_log_joint(
    comps: Sequence[GaussianSource], priors: Sequence[float], x_t: torch.Tensor, t: torch.Tensor, labels
) -> torch.Tensor:
    """(N, K) log lambda_i P(y | i) q_i(x_t | y) (the null class: log lambda_i q_i(x_t))."""
    t = torch.as_tensor(t).long().expand(x_t.shape[0])
    cols = []
    for p, c in zip(priors, comps, strict=True):
        col = math.log(p) + c.log_marginal(x_t, t, labels)
        if labels is not None and c.num_classes:
            lp = c.log_pis[labels.clamp(max=c.num_classes - 1)]
            col = col + torch.where(labels < c.num_classes, lp, torch.zeros_like(lp))
        cols.append(col)
    return torch.stack(cols, 1)


def exact_posterior(comps, priors, allowed: Sequence[int], x_t, t, labels=None) -> torch.Tensor:
    """(N, K) P(i | x_t, y) over ``allowed`` (priors renormalised over it), zero outside."""
    logits = exact_log_joint(comps, priors, x_t, t, labels)
    mask = torch.zeros(len(comps), dtype=torch.bool)
    mask[list(allowed)] = True
    return torch.softmax(logits.masked_fill(~mask, -math.inf), 1)


def mixture_eps(comps, priors, allowed: Sequence[int], x_t, t, labels=None) -> torch.Tensor:
    """eps* = -sigma_t grad log p(x_t | y) of the sub-mixture over ``allowed``, by autograd (weights play no part)."""
    t = torch.as_tensor(t).long().expand(x_t.shape[0])
    x = x_t.clone().requires_grad_(True)
    with torch.enable_grad():
        logs = exact_log_joint([comps[i] for i in allowed], [priors[i] for i in allowed], x, t, labels)
        (grad,) = torch.autograd.grad(torch.logsumexp(logs, 1).sum(), x)
    return -(1 - ABAR[t]).sqrt().view(-1, 1, 1, 1) * grad


def make_sources(classes: int = 1, seed: int = 0) -> list[GaussianSource]:
    """Three sources, scales 0.3, 0.6, 1.0, means ~N(0, 1.5^2); ``classes`` > 1: unequal P(c | i) per source."""
    g = torch.Generator().manual_seed(seed)
    comps = []
    for i, s in enumerate((0.3, 0.6, 1.0)):
        mus = torch.randn((classes, *SHAPE), generator=g, dtype=torch.float64) * 1.5
        pis = (
            None if classes == 1 else [float(v) for v in torch.softmax(torch.randn(classes, generator=g) * (i + 1), 0)]
        )
        comps.append(GaussianSource(mus, s, pis))
    return comps
