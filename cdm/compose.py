"""Composition: eps(x_t, t, c) = sum_{i in S_n} w_i(x_t, t, c) eps_i(x_t, t, c), for every row n of a batch.

CDM (Golatkar et al. 2023, eq. 5) / Decentralized Diffusion Models (McAllister et al. 2025): the optimal denoiser of a
mixture is the posterior-weighted sum of the per-source denoisers. The rule, the same for every router kind:

1. allowed sets: row n may use the sources S_n (access rights), one row of a (N, K) bool mask, so requests with
   different rights share a batch. Compartments outside S_n never see row n and weigh 0 there.
2. weights: w_n = P(i | x_t, t, c) over S_n, i.e. a softmax of log-posteriors restricted to S_n (the priors
   renormalised over S_n): the learnt router's logits here, tracked log-densities in cdm/routing/density.py,
   log lambda_i + per-source head logits in cdm/routing/heads.py.
3. top-k (learnt and heads kinds): keep row n's k_n largest weights and renormalise; k_n >= |S_n| is the full mixture.
4. mix: each compartment runs at most once per call, on exactly the rows where its weight is > 0.

Attribution (the weights averaged over the sampling steps) is in cdm/attribution.py, classifier-free guidance in
cdm/guidance.py, the routing kinds in cdm/routing/. A composition is itself a denoiser (k-diffusion): ``__call__``
returns eps, ``compose`` returns eps and the weights (``ComposeOutput``).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from cdm._vmap import StackedDenoisers
from cdm.config import ModelConfig, RoutingKind
from cdm.denoiser import ComposeOutput, Composer, expand_timesteps
from cdm.errors import ConfigError
from cdm.guidance import Guided, check_guidance_scale

if TYPE_CHECKING:
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

Mode = Literal["full", "top_k"]
Vectorize = Literal["auto", "loop", "vmap"]
Allowed = Sequence[str] | torch.Tensor | None  # source names for every row, a (N, K) bool mask, or None = all
TopK = int | torch.Tensor | None  # k for every row, a (N,) tensor of k per row, or None = the full mixture


def allowed_mask(names: Sequence[str], allowed: Allowed, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(N, K) bool: which of ``names`` each row may use. ``allowed``: None (all), source names, or a (N, K) mask."""
    k = len(names)
    if allowed is None:
        return torch.ones((n, k), dtype=torch.bool, device=device)
    if isinstance(allowed, torch.Tensor):
        if allowed.dtype != torch.bool or tuple(allowed.shape) != (n, k):
            raise ConfigError(
                f"an allowed mask must be a bool tensor of shape ({n}, {k}) (rows x {list(names)}), got "
                f"{allowed.dtype} {tuple(allowed.shape)}"
            )
        empty = (~allowed.any(1)).nonzero(as_tuple=True)[0]
        if empty.numel():
            raise ConfigError(f"row {int(empty[0])} of the allowed mask allows no source; allow at least one")
        return allowed.to(device)
    if isinstance(allowed, str):
        raise ConfigError(f"sources must be a list of names, got the string {allowed!r}; write [{allowed!r}]")
    unknown = [s for s in allowed if s not in names]
    if unknown:
        raise ConfigError(f"unknown source(s) {unknown}; available: {list(names)}")
    if not allowed:
        raise ConfigError("the access subset is empty; name at least one source")
    row = torch.tensor([name in allowed for name in names], dtype=torch.bool, device=device)
    return row.expand(n, k).clone()


def check_top_k(top_k: TopK, n: int) -> int | torch.Tensor | None:
    """``top_k`` checked: None, an int >= 1, or a (N,) integer tensor of values >= 1 (0 is an error, not a default)."""
    if top_k is None:
        return None
    if isinstance(top_k, torch.Tensor):
        if top_k.is_floating_point() or top_k.dtype == torch.bool or tuple(top_k.shape) != (n,):
            raise ConfigError(
                f"a per-row top_k must be an integer tensor of shape ({n},), got {top_k.dtype} {tuple(top_k.shape)}"
            )
        if bool((top_k < 1).any()):
            raise ConfigError(f"top_k must be >= 1 in every row, got {int(top_k.min())}; use None for the full mixture")
        return top_k.long()
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise ConfigError(f"top_k must be an integer >= 1 or None (full mixture), got {top_k!r}")
    if top_k < 1:
        raise ConfigError(f"top_k must be >= 1, got {top_k}; use None for the full mixture")
    return top_k


def restricted_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Row n: softmax of ``logits[n]`` over the columns ``mask[n]`` allows, zero elsewhere: w_i / sum_{j in S_n} w_j."""
    return torch.softmax(logits.masked_fill(~mask, -torch.inf), dim=-1)


def top_k_weights(w: torch.Tensor, k: int | torch.Tensor) -> torch.Tensor:
    """Keep each row's k (or k_n) largest weights and renormalise them; rows with k_n >= their nonzero count are
    returned unchanged. Ties go to the lower column."""
    n, width = w.shape
    kk = torch.as_tensor(k, device=w.device).long().expand(n)
    order = w.argsort(dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(width, device=w.device).expand(n, width))
    kept = torch.where(ranks < kk[:, None], w, torch.zeros_like(w))
    renorm = kept / kept.sum(-1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
    cut = kk < (w > 0).sum(1)
    return torch.where(cut[:, None], renorm, w)


def mix(
    compartments: Iterable[nn.Module],
    w: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    class_labels: torch.Tensor | None,
) -> torch.Tensor:
    """sum_i w_i eps_i, calling each compartment once, on exactly the rows where its weight is > 0."""
    n = x_t.shape[0]
    wx = w.to(x_t.dtype)
    eps = torch.zeros_like(x_t)
    for i, compartment in enumerate(compartments):
        rows = (w[:, i] > 0).nonzero(as_tuple=True)[0]
        if rows.numel() == 0:
            continue
        if rows.numel() == n:
            eps = eps + wx[:, i].view(-1, 1, 1, 1) * compartment(x_t, t, class_labels)
        else:
            c = class_labels[rows] if class_labels is not None else None
            eps[rows] += wx[rows, i].view(-1, 1, 1, 1) * compartment(x_t[rows], t[rows], c)
    return eps


def check_class_priors(class_priors: torch.Tensor | None, k: int) -> torch.Tensor | None:
    """``class_priors`` as a float64 (K, num_classes) tensor of counts n_{i,c} (None stays None); ConfigError unless
    finite and non-negative."""
    if class_priors is None:
        return None
    cp = torch.as_tensor(class_priors).double()
    if cp.ndim != 2 or cp.shape[0] != k or bool((cp < 0).any()) or not bool(torch.isfinite(cp).all()):
        raise ConfigError(f"class_priors must be a finite non-negative ({k}, num_classes) tensor")
    return cp


def row_priors(
    priors: torch.Tensor, class_priors: torch.Tensor | None, class_labels: torch.Tensor | None, n: int
) -> torch.Tensor:
    """(N, K) lambda_i of each of ``n`` rows, on ``priors``' device and dtype: ``priors`` (K,), or for a row labelled
    c < num_classes ``class_priors[:, c]`` (P(i | c) proportional to n_{i,c}) when there are class priors; the null
    class and unlabelled rows keep ``priors``. Unnormalised (only ratios matter)."""
    lam = priors.expand(n, -1).clone()
    if class_priors is not None and class_labels is not None:
        c = torch.as_tensor(class_labels, device=priors.device).long().flatten().expand(n)
        labelled = (c >= 0) & (c < class_priors.shape[1])
        lam[labelled] = class_priors[:, c[labelled]].T
    return lam


class Composed(nn.Module):
    """Compartments composed under one routing kind: what ``CompartmentalPipeline`` samples from.

    Subclasses (``ComposedDenoiser`` for the learnt kind, ``cdm.routing.density.DensityComposition``) implement
    ``sampler``, which makes the denoiser of one sampling call (a fresh trajectory where the kind has state).

    Args:
        compartments: one Denoiser module per source, in ``names`` order (unique names).
        names: source names (the columns of weights and attribution).
        subset: the sources this composition may ever use (access rights); None = all. Per-call allowed sets are
            intersected with it.
    """

    kind: RoutingKind

    def __init__(self, compartments: Sequence[nn.Module], names: Sequence[str], subset: Sequence[str] | None) -> None:
        super().__init__()
        if len(compartments) != len(names):
            raise ConfigError(f"{len(compartments)} compartments but {len(names)} source names")
        if not compartments:
            raise ConfigError("nothing to compose: no compartments")
        if len(set(names)) != len(names):
            raise ConfigError(f"source names must be unique, got {list(names)}")
        self.compartments = nn.ModuleList(compartments)
        self.source_names = [str(n) for n in names]
        self.subset = sorted({self.source_names.index(s) for s in _check_subset(self.source_names, subset)})

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
        """Classes of the compartments' conditioning; label ``num_classes`` is the null class (0: unconditional)."""
        return int(self._first.num_classes)

    @property
    def model_config(self) -> ModelConfig:
        cfg: ModelConfig = self._first.manifest.model_config
        return cfg

    @property
    def device(self) -> torch.device:
        first = next(itertools.chain(self.parameters(), self.buffers()), None)
        return first.device if first is not None else torch.device("cpu")

    def allowed(self, allowed: Allowed, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """(N, K) mask of ``allowed`` (None, names or a mask) intersected with this composition's subset."""
        mask = allowed_mask(self.source_names, allowed, n, device)
        ceiling = torch.zeros(len(self.source_names), dtype=torch.bool, device=mask.device)
        ceiling[self.subset] = True
        both = mask & ceiling
        empty = (~both.any(1)).nonzero(as_tuple=True)[0]
        if empty.numel():
            outside = [self.source_names[i] for i in mask[int(empty[0])].nonzero(as_tuple=True)[0].tolist()]
            inside = [self.source_names[i] for i in self.subset]
            raise ConfigError(f"row {int(empty[0])} allows only {outside}, outside this composition's subset {inside}")
        return both

    def sampler(
        self,
        n: int,
        *,
        allowed: Allowed = None,
        top_k: TopK = None,
        guidance_scale: float = 1.0,
        scheduler: SchedulerMixin | None = None,
        generator: torch.Generator | None = None,
    ) -> Composer:
        """The denoiser of one sampling call over ``n`` rows (per-row ``allowed`` and ``top_k``; guidance when
        ``guidance_scale != 1``, which then needs class labels at every call)."""
        raise NotImplementedError


def _check_subset(names: Sequence[str], subset: Sequence[str] | None) -> Sequence[str]:
    if subset is None:
        return names
    if isinstance(subset, str):
        raise ConfigError(f"subset must be a list of names, got the string {subset!r}; write [{subset!r}]")
    unknown = [s for s in subset if s not in names]
    if unknown:
        raise ConfigError(f"unknown source(s) {unknown}; available: {list(names)}")
    if not subset:
        raise ConfigError("the access subset is empty; name at least one source")
    return subset


class ComposedDenoiser(Composed):
    """The learnt kind: compartment predictions mixed with a router's posteriors. A Denoiser.

    Args:
        compartments: one Denoiser module per source, in ``source_names`` order.
        router: module returning logits (N, K_router) whose columns are ``router_names``.
        source_names: names of ``compartments``.
        router_names: column names of the router's logits (a superset of ``source_names``); defaults to
            ``router.source_names``.
        mode: "full" mixes every allowed compartment; "top_k" keeps each row's ``top_k`` largest weights.
        top_k: k (>= 1) for mode "top_k".
        subset: names of the sources this composition may use (access rights); None = all. Compartments outside it
            are never evaluated and their weights are zero.
        vectorize: "loop" evaluates compartments one by one, "vmap" in one vectorised call (full mode, every row
            allowed the same sources), "auto" picks vmap on CUDA and the loop on CPU, where it measured faster.
    """

    kind: RoutingKind = "learnt"

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
        super().__init__(compartments, source_names, subset)
        self.router = router
        rnames = [str(n) for n in (router_names if router_names is not None else router.source_names)]  # type: ignore[union-attr]
        self.router_names = rnames
        missing = [n for n in self.source_names if n not in rnames]
        if missing:
            raise ConfigError(f"the router was not trained on {missing}; retrain the router")
        self._router_cols = [rnames.index(n) for n in self.source_names]
        if mode not in ("full", "top_k"):
            raise ConfigError(f"mode {mode!r} is not one of 'full', 'top_k'")
        check_top_k(top_k, 1)
        if vectorize not in ("auto", "loop", "vmap"):
            raise ConfigError(f"vectorize {vectorize!r} is not one of 'auto', 'loop', 'vmap'")
        self.mode: Mode = mode
        self.top_k = top_k
        self.vectorize: Vectorize = vectorize
        self._stack_cache = _stack_cache if _stack_cache is not None else {}

    def configured(
        self,
        *,
        mode: Mode | None = None,
        top_k: int | None = None,
        subset: Sequence[str] | None = None,
        vectorize: Vectorize | None = None,
    ) -> ComposedDenoiser:
        """The same compartments and router with other options (None keeps this one's; shares the vmap stack)."""
        return type(self)(
            list(self.compartments),
            self.router,
            self.source_names,
            router_names=self.router_names,
            mode=mode if mode is not None else self.mode,
            top_k=top_k if top_k is not None else self.top_k,
            subset=subset if subset is not None else [self.source_names[i] for i in self.subset],
            vectorize=vectorize if vectorize is not None else self.vectorize,
            _stack_cache=self._stack_cache,
        )

    def weights(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        *,
        allowed: Allowed = None,
        top_k: TopK = None,
    ) -> torch.Tensor:
        """(N, K) weights over ``source_names``: the router posterior restricted to each row's allowed set (and to
        its top k; ``top_k`` None = this denoiser's mode)."""
        n = x_t.shape[0]
        tt = expand_timesteps(t, n, x_t.device)
        mask = self.allowed(allowed, n, x_t.device)
        k = check_top_k(top_k, n) if top_k is not None else (self.top_k if self.mode == "top_k" else None)
        logits, mask = self._logits(x_t, tt, class_labels, mask)
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()  # posteriors in at least fp32, whatever the compartments run in
        w = restricted_softmax(logits, mask)
        return w if k is None else top_k_weights(w, k)

    def _logits(
        self, x_t: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, K) log-posteriors up to a per-row constant over ``source_names``, and the mask they are defined on
        (``mask`` here; a kind may narrow it, e.g. to sources of nonzero prior). Here: the router's logits."""
        return self.router(x_t, t, class_labels)[:, self._router_cols], mask

    def compose(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        *,
        allowed: Allowed = None,
        top_k: TopK = None,
    ) -> ComposeOutput:
        """eps = sum_i w_i eps_i and the weights w (see ``weights``); each compartment runs once, on its rows."""
        n = x_t.shape[0]
        tt = expand_timesteps(t, n, x_t.device)
        w = self.weights(x_t, tt, class_labels, allowed=allowed, top_k=top_k)
        used = w > 0
        cols = used[0].nonzero(as_tuple=True)[0].tolist()
        if bool((used == used[:1]).all()) and self._use_vmap(x_t, len(cols)):  # every row uses the same compartments
            eps_all = self._stack(tuple(cols))(x_t, tt, class_labels)  # (|S|, N, C, H, W)
            return ComposeOutput(torch.einsum("kn,kn...->n...", w[:, cols].T.to(x_t.dtype), eps_all), w)
        return ComposeOutput(mix(self.compartments, w, x_t, tt, class_labels), w)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.compose(x_t, t, class_labels).eps

    def sampler(
        self,
        n: int,
        *,
        allowed: Allowed = None,
        top_k: TopK = None,
        guidance_scale: float = 1.0,
        scheduler: SchedulerMixin | None = None,
        generator: torch.Generator | None = None,
    ) -> Composer:
        """Stateless: this denoiser bound to the call's allowed sets, top k and guidance (``scheduler`` and
        ``generator`` are not needed by the learnt kind)."""
        mask = self.allowed(allowed, n, self.device)
        k = check_top_k(top_k, n)
        scale = check_guidance_scale(guidance_scale)
        if scale == 1.0:
            return _Bound(self, mask, k)
        rows_k = k.repeat(2) if isinstance(k, torch.Tensor) else k
        return Guided(_Bound(self, mask.repeat(2, 1), rows_k), scale, self.num_classes)

    def _use_vmap(self, x_t: torch.Tensor, width: int) -> bool:
        if self.vectorize == "vmap":
            return True
        return self.vectorize == "auto" and x_t.device.type == "cuda" and width > 1

    def _stack(self, cols: tuple[int, ...]) -> StackedDenoisers:
        if cols not in self._stack_cache:
            self._stack_cache[cols] = StackedDenoisers([self.compartments[i] for i in cols])
        return self._stack_cache[cols]


class _Bound:
    """A ComposedDenoiser with one call's allowed mask and top k fixed (a Composer)."""

    def __init__(self, den: ComposedDenoiser, mask: torch.Tensor, top_k: int | torch.Tensor | None) -> None:
        self.den, self.mask, self.top_k = den, mask, top_k

    def compose(self, x_t: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> ComposeOutput:
        return self.den.compose(x_t, t, class_labels, allowed=self.mask, top_k=self.top_k)

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.compose(x_t, t, class_labels).eps
