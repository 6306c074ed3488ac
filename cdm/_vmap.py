"""Vectorised evaluation of K same-architecture compartments in one ``torch.func.vmap`` call (``vectorize="vmap"``).

``ComposedDenoiser`` (cdm/compose.py) uses it for the full mixture on CUDA; the composition rule does not depend on it.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from cdm.errors import ConfigError


class _VmapGroupNorm(nn.GroupNorm):
    """GroupNorm written with reductions so ``torch.func.vmap`` can batch it (native group_norm cannot on CPU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xr = x.reshape(shape[0], self.num_groups, -1)
        mean = xr.mean(-1, keepdim=True)
        var = xr.var(-1, unbiased=False, keepdim=True)
        y = ((xr - mean) * torch.rsqrt(var + self.eps)).reshape(shape)
        if self.affine:
            view = (1, shape[1]) + (1,) * (len(shape) - 2)
            y = y * self.weight.view(view) + self.bias.view(view)
        return y


class StackedDenoisers:
    """K same-architecture compartments evaluated in one ``vmap``-ed functional call: returns (K, N, ...)."""

    def __init__(self, compartments: Sequence[nn.Module]) -> None:
        modules = list(compartments)
        if not modules:
            raise ConfigError("StackedDenoisers needs at least one compartment")
        arch = [self._arch(m) for m in modules]
        if any(a != arch[0] for a in arch):
            raise ConfigError("compartments differ in architecture; use vectorize = 'loop'")
        self.params, self.buffers = torch.func.stack_module_state(modules)
        base = copy.deepcopy(modules[0]).to("meta")
        for m in base.modules():
            if type(m) is nn.GroupNorm:
                m.__class__ = _VmapGroupNorm
        self.base = base

    @staticmethod
    def _arch(m: nn.Module) -> Any:
        unet = getattr(m, "unet", None)
        return dict(unet.config) if unet is not None else tuple((k, v.shape) for k, v in m.state_dict().items())

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        def one(params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor]) -> torch.Tensor:
            return torch.func.functional_call(self.base, (params, buffers), (x_t, t, class_labels))

        with warnings.catch_warnings():
            # attention has no vmap batching rule on CPU yet; the fallback is correct, only slower
            warnings.filterwarnings("ignore", message=".*performance drop.*", category=UserWarning)
            return torch.func.vmap(one)(self.params, self.buffers)
