"""Composition: eps(x_t, t, c) = sum_{i in S} w_i(x_t, t, c) eps_i(x_t, t, c) with w renormalised over S.

CDM (Golatkar et al. 2023, eq. 5) / Decentralized Diffusion Models (McAllister et al. 2025): the optimal denoiser of a
mixture is the posterior-weighted sum of the per-source denoisers. A ComposedDenoiser is itself a Denoiser.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from cdm._vmap import StackedDenoisers
from cdm.config import ModelConfig
from cdm.denoiser import expand_timesteps
from cdm.errors import ConfigError

Mode = Literal["full", "top_k"]
Vectorize = Literal["auto", "loop", "vmap"]


def renormalised_weights(logits: torch.Tensor, subset: Sequence[int]) -> torch.Tensor:
    """w_i / sum_{j in S} w_j as a full-width (N, K) tensor with zeros outside S (softmax restricted to S)."""
    w = torch.zeros_like(logits)
    idx = torch.as_tensor(list(subset), device=logits.device, dtype=torch.long)
    w[:, idx] = F.softmax(logits[:, idx], dim=-1)
    return w


def top_k_weights(w: torch.Tensor, k: int) -> torch.Tensor:
    """Keep each row's k largest weights and renormalise them to sum to one."""
    k = min(k, w.shape[1])
    vals, idx = w.topk(k, dim=-1)
    out = torch.zeros_like(w)
    out.scatter_(1, idx, vals / vals.sum(-1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny))
    return out


class ComposedDenoiser(nn.Module):
    """A Denoiser mixing compartment predictions with router posteriors.

    Args:
        compartments: one Denoiser module per source, in ``source_names`` order.
        router: module returning logits (N, K_router) whose columns are ``router_names``.
        source_names: names of ``compartments``.
        router_names: column names of the router's logits (a superset of ``source_names``); defaults to
            ``router.source_names``.
        mode: "full" mixes every compartment in S; "top_k" keeps each sample's k largest weights.
        top_k: k for mode "top_k".
        subset: names of the sources this caller may use (access rights); None = all. Compartments outside S are
            never evaluated and their weights are zero.
        vectorize: "loop" evaluates compartments one by one, "vmap" in one vectorised call (full mode only),
            "auto" picks vmap on CUDA and the loop on CPU, where it measured faster.
    """

    def __init__(
        self,
        compartments: Sequence[nn.Module],
        router: nn.Module,
        source_names: Sequence[str],
        *,
        router_names: Sequence[str] | None = None,
        mode: Mode = "full",
        top_k: int = 1,
        subset: Sequence[str] | None = None,
        vectorize: Vectorize = "auto",
        _stack_cache: dict[tuple[int, ...], StackedDenoisers] | None = None,
    ) -> None:
        super().__init__()
        if len(compartments) != len(source_names):
            raise ConfigError(f"{len(compartments)} compartments but {len(source_names)} source names")
        if not compartments:
            raise ConfigError("nothing to compose: no compartments")
        self.compartments = nn.ModuleList(compartments)
        self.router = router
        self.source_names = list(source_names)
        rnames = [str(n) for n in (router_names if router_names is not None else router.source_names)]  # type: ignore[union-attr]
        self.router_names = rnames
        missing = [n for n in self.source_names if n not in rnames]
        if missing:
            raise ConfigError(f"the router was not trained on {missing}; retrain the router")
        self._router_cols = [rnames.index(n) for n in self.source_names]
        if mode not in ("full", "top_k"):
            raise ConfigError(f"mode {mode!r} is not one of 'full', 'top_k'")
        if top_k < 1:
            raise ConfigError(f"top_k must be >= 1, got {top_k}")
        self.mode: Mode = mode
        self.top_k = top_k
        if subset is None:
            self.subset = list(range(len(self.source_names)))
        else:
            unknown = [s for s in subset if s not in self.source_names]
            if unknown:
                raise ConfigError(f"unknown source(s) {unknown}; available: {self.source_names}")
            if not subset:
                raise ConfigError("the access subset is empty; name at least one source")
            self.subset = sorted({self.source_names.index(s) for s in subset})
        self.vectorize: Vectorize = vectorize
        self._stack_cache = _stack_cache if _stack_cache is not None else {}
        self.last_weights: torch.Tensor | None = None

    def configured(
        self,
        *,
        mode: Mode | None = None,
        top_k: int | None = None,
        subset: Sequence[str] | None = None,
        vectorize: Vectorize | None = None,
    ) -> ComposedDenoiser:
        """The same compartments and router with other options (shares weights and the vmap stack)."""
        return ComposedDenoiser(
            list(self.compartments),
            self.router,
            self.source_names,
            router_names=self.router_names,
            mode=mode or self.mode,
            top_k=top_k or self.top_k,
            subset=subset if subset is not None else [self.source_names[i] for i in self.subset],
            vectorize=vectorize or self.vectorize,
            _stack_cache=self._stack_cache,
        )

    @property
    def _first(self) -> Any:
        return self.compartments[0]

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images the compartments denoise."""
        cfg = self._first.unet.config
        return int(cfg.in_channels), int(cfg.sample_size), int(cfg.sample_size)

    @property
    def num_classes(self) -> int:
        return int(self._first.num_classes)

    @property
    def model_config(self) -> ModelConfig:
        cfg: ModelConfig = self._first.manifest.model_config
        return cfg

    def weights(self, x_t: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """(N, K) weights over ``source_names``: router posterior restricted to S (and to the top k)."""
        n = x_t.shape[0]
        tt = expand_timesteps(t, n, x_t.device)
        logits = self.router(x_t, tt, class_labels)[:, self._router_cols]
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()  # posteriors in at least fp32, whatever the compartments run in
        w = renormalised_weights(logits, self.subset)
        if self.mode == "top_k" and self.top_k < len(self.subset):
            w = top_k_weights(w, self.top_k)
        return w

    def _use_vmap(self, x_t: torch.Tensor) -> bool:
        if self.vectorize == "vmap":
            return True
        return self.vectorize == "auto" and x_t.device.type == "cuda" and len(self.subset) > 1

    def _stack(self) -> StackedDenoisers:
        key = tuple(self.subset)
        if key not in self._stack_cache:
            self._stack_cache[key] = StackedDenoisers([self.compartments[i] for i in self.subset])
        return self._stack_cache[key]

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        n = x_t.shape[0]
        tt = expand_timesteps(t, n, x_t.device)
        w = self.weights(x_t, tt, class_labels)
        self.last_weights = w
        wx = w.to(x_t.dtype)
        if self.mode == "full" and self._use_vmap(x_t):
            eps_all = self._stack()(x_t, tt, class_labels)  # (|S|, N, C, H, W)
            return torch.einsum("kn,kn...->n...", wx[:, self.subset].T, eps_all)
        eps = torch.zeros_like(x_t)
        for i in self.subset:
            # each compartment runs once per step, only on the samples that routed to it
            rows = (w[:, i] > 0).nonzero(as_tuple=True)[0]
            if rows.numel() == 0:
                continue
            if rows.numel() == n:
                eps = eps + wx[:, i].view(-1, 1, 1, 1) * self.compartments[i](x_t, tt, class_labels)
            else:
                c = class_labels[rows] if class_labels is not None else None
                eps[rows] += wx[rows, i].view(-1, 1, 1, 1) * self.compartments[i](x_t[rows], tt[rows], c)
        return eps
