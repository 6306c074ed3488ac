"""The one contract every model obeys: a denoiser maps (x_t, t, class_labels) to predicted noise.

Following k-diffusion, wrappers (composition, access filtering) are denoisers too, so they stack.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Denoiser(Protocol):
    """eps_theta(x_t, t, c): ``x_t`` (N,C,H,W), ``t`` (N,) long diffusers timesteps, ``class_labels`` (N,) or None."""

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor: ...


class RouterFn(Protocol):
    """Source posterior logits: log P(source i | x_t, t, c) up to a constant, shape (N, K)."""

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor: ...


def expand_timesteps(t: torch.Tensor | int, n: int, device: torch.device) -> torch.Tensor:
    """Broadcast a scalar or (N,) timestep to a (N,) long tensor."""
    tt = torch.as_tensor(t, device=device)
    if tt.ndim == 0:
        tt = tt.expand(n)
    return tt.long()
