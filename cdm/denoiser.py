"""The one contract every model obeys: a denoiser maps (x_t, t, class_labels) to predicted noise.

Following k-diffusion, wrappers (composition, access filtering, guidance) are denoisers too, so they stack. A
``Composer`` is a denoiser that also says how it mixed its compartments (``ComposeOutput``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Denoiser(Protocol):
    """eps_theta(x_t, t, c): ``x_t`` (N,C,H,W), ``t`` (N,) long diffusers timesteps, ``class_labels`` (N,) or None."""

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor: ...


@dataclass(frozen=True)
class ComposeOutput:
    """One composed call. eps: (N, C, H, W). weights: (N, K) the w used, columns = the composition's source names,
    zero outside each row's allowed set and top k. null_weights: under guidance, the unconditional branch's weights
    (``weights`` are then the conditional branch's); None otherwise."""

    eps: torch.Tensor
    weights: torch.Tensor
    null_weights: torch.Tensor | None = None


class Composer(Protocol):
    """A denoiser that also returns its weights: what a sampling loop calls once per step."""

    def compose(self, x_t: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> ComposeOutput:
        """eps and the weights used."""
        ...

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """eps only."""
        ...


def expand_timesteps(t: torch.Tensor | int, n: int, device: torch.device) -> torch.Tensor:
    """Broadcast a scalar or (N,) timestep to a (N,) long tensor."""
    tt = torch.as_tensor(t, device=device)
    if tt.ndim == 0:
        tt = tt.expand(n)
    return tt.long()
