"""Classifier-free guidance of a composition (Ho & Salimans 2022): eps = eps_bar(null) + s (eps_bar(c) - eps_bar(null)).

Each branch is composed with its own weights, eps_bar(y) = sum_i w_i(x_t, t, y) eps_i(x_t, t, y) (issue 12): the
conditional branch mixes P(i | x_t, c), the unconditional one P(i | x_t), so the guided eps is the guided eps of the
mixture p(x) = sum_i lambda_i q_i(x) itself, not a mix of per-compartment guided predictions. Both branches run as one
batch of 2N rows, [x; x] with labels [c; null], through the inner composer: each compartment is called once per step
for both branches, and a density trajectory (cdm/routing/density.py) keeps each row's own log-densities, log q_i(x | c)
on the first N rows and log q_i(x) on the last N. s = 1 is the conditional model: callers skip the null branch then
(``check_guidance_scale`` gives the scale, the compositions' ``sampler`` does the skipping), so it equals unguided
sampling exactly.
"""

from __future__ import annotations

import math

import torch

from cdm.denoiser import ComposeOutput, Composer
from cdm.errors import ConfigError


def check_guidance_scale(scale: float) -> float:
    """``scale`` as a float if it is finite and >= 0 (0: unconditional, 1: conditional, > 1: guided)."""
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale) or scale < 0:
        raise ConfigError(f"guidance_scale must be a finite number >= 0 (1 = no guidance), got {scale!r}")
    return float(scale)


def guide(eps_cond: torch.Tensor, eps_null: torch.Tensor, scale: float) -> torch.Tensor:
    """eps_bar(null) + s (eps_bar(c) - eps_bar(null)): the guided eps from its two composed branches."""
    return eps_null + scale * (eps_cond - eps_null)


class Guided:
    """Classifier-free guidance around a composer of 2N rows (a Composer of N rows).

    Args:
        inner: composes the 2N rows [x; x] with labels [c; null] (its allowed sets and top k already doubled).
        scale: s, the guidance scale.
        null_label: the null class index (``num_classes`` of the compartments).
    """

    def __init__(self, inner: Composer, scale: float, null_label: int) -> None:
        if null_label < 1:
            raise ConfigError("guidance needs class-conditional compartments (num_classes > 0); set guidance_scale = 1")
        self.inner = inner
        self.scale = check_guidance_scale(scale)
        self.null_label = null_label

    def compose(self, x_t: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> ComposeOutput:
        if class_labels is None:
            raise ConfigError("guidance_scale != 1 needs class labels (guiding towards the null class is a no-op)")
        n = x_t.shape[0]
        tt = torch.as_tensor(t, device=x_t.device).expand(n)
        null = torch.full_like(class_labels, self.null_label)
        # 1. both branches in one batch: rows [0, N) conditional, [N, 2N) unconditional
        out = self.inner.compose(torch.cat([x_t, x_t]), torch.cat([tt, tt]), torch.cat([class_labels, null]))
        cond, uncond = out.eps[:n], out.eps[n:]
        # 2. eps_bar(null) + s (eps_bar(c) - eps_bar(null)), each eps_bar with its own weights
        eps = guide(cond, uncond, self.scale)
        return ComposeOutput(eps, out.weights[:n], out.weights[n:])

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.compose(x_t, t, class_labels).eps
