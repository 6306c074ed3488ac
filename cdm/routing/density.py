"""Training-free density routing: SuperDiff (Skreta et al. 2024, "The Superposition of Diffusion Models Using the
Itô Density Estimator", arXiv 2412.17762) for compartments.

The composed denoiser is eps = sum_{i in S} w_i eps_i with w_i = P(i | x_t, t, c) = lambda_i q_i^t(x_t) /
sum_{j in S} lambda_j q_j^t(x_t) (CDM, Golatkar et al. 2023, eq. 5), where q_i^t is source i's noised marginal.
Nothing is trained on any source: l_i = log q_i^t(x_t) is tracked along the sampling trajectory from compartment i's
own eps outputs and the trajectory's actual increments, so adding or forgetting a source changes only the list of
compartments.

Maths (diffusers VP schedule, epsilon prediction, integer timesteps). x_t = sqrt(abar_t) x_0 + sigma_t eps with
sigma_t = sqrt(1 - abar_t); compartment i's score is s_i(x, t) = -eps_i(x, t) / sigma_t. With lambda = -log abar
(increasing with noise) the forward process is the VP SDE dx = -x/2 dlambda + dW_lambda, and every source's marginal
solves its Fokker-Planck equation

    d log q / d lambda = F(x, s) + d/2,   F = (<x, s> + div s + |s|^2) / 2.                              (FP)

* Itô estimator (``estimator="ito"``, the paper's Theorem 1). Along a reverse-time SDE path whose noise has the
  forward process' variance, d[x] = -dlambda I, Itô's formula gives dl = <s, dx> + (FP) dlambda - (1/2) div s
  dlambda, and the divergence cancels:  dl_i = <s_i, dx> + (<x, s_i> + |s_i|^2) dlambda / 2 (+ d dlambda / 2, the
  same for every i). Discretised at the left point, as Itô integrals must be, with the previous call's eps_i and the
  actual increment dx = x_{k+1} - x_k, h = log abar_{k+1} - log abar_k = -dlambda > 0:

      l_i += <s_i, dx> - h (<x_k, s_i> + |s_i|^2) / 2,    s_i = -eps_i(x_k, t_k) / sigma_{t_k}.

  It costs nothing beyond the K forward passes per step, works for any drift (guidance, clipping, the composed eps
  itself) but needs a sampler that injects the forward noise: DDPM ancestral, DDIM with eta = 1, SDE-DPM-Solver++.
  On a deterministic sampler (DDIM eta = 0, DPM-Solver++) the divergence does not cancel and the weights are wrong
  by O(1) at any step count (measured: TV error 0.5-0.7), so the sampler is checked once, at the first step small
  enough to tell: the realised noise around DDPM's posterior mean over its variance beta_tilde is 0.9-1.05 on DDPM,
  DDIM eta = 1 and SDE-DPM-Solver++ and 0.1-0.35 on DDIM eta = 0 and DPM-Solver++ (with or without clipping), and
  below 1/2 the trajectory raises. The check is one-sided: a drift that differs from DDPM's (guidance) only adds to
  the residual, so it never refuses a stochastic sampler but may let a strongly guided deterministic one through.
* Divergence estimator (``estimator="divergence"``, any sampler). l_i is a state function, so its change between two
  calls is the integral of dl_i = <s_i, dx> + (FP) dlambda along any path: the straight segment from (x_k, r_k) to
  (x_{k+1}, r_{k+1}) in r = sqrt(abar / (1 - abar)), by the trapezoid rule with the scores at both ends:

      l_i += <s_i^k + s_i^{k+1}, dx> / 2 + (r_{k+1} - r_k) (F_i^k lambda'(r_k) + F_i^{k+1} lambda'(r_{k+1})) / 2,

  lambda'(r) = -2 / (r (1 + r^2)). The time variable matters: at high noise the source-dependent part of log q_i is
  linear in sqrt(abar) (about <x, sqrt(abar) E_i[x_0]>), so a trapezoid in lambda overshoots on the large first
  log-SNR steps (measured with exact divergences: 2.5x larger errors at 50 DDIM steps, 6000x at 1000); in r it is
  second order. div s_i = -div eps_i / sigma comes from
  one Hutchinson probe per row and step, v Rademacher, shared by all compartments (its noise partly cancels in the
  differences the softmax sees), as the forward difference <v, eps_i(x + delta v) - eps_i(x)> / delta, evaluated in
  the same call as eps_i. Cost: K calls per step on (1 + probes) N rows.
* Initial value. At the first call l_i = log q_i^T(x_T) with q_i^T ~ N(sqrt(abar_T) m_i, sigma_T^2 I) (the data
  covariance is O(abar_T)), i.e. l_i = -|x_T - sqrt(abar_T) x0hat_i|^2 / (2 sigma_T^2) = -|eps_i(x_T)|^2 / 2 + const
  (``init="score"``): exact to first order in sqrt(abar_T), error O(abar_T tr Cov_i). ``init="prior"`` takes
  q_i^T = N(0, I) for every i, error O(sqrt(abar_T) <x_T, m_i>): at a 50-step "leading" schedule (abar_T ~ 1e-3 on
  the cosine schedule) that is ~1 nat on 16-dim toys and tens of nats on 32x32x3 images.
* Weights: w = softmax over S_n of (log lambda_i + l_i), S_n row n's allowed set (cdm/compose.py's rule: a per-row
  mask, so requests with different rights share a trajectory); the renormalisation of lambda over S_n and every term
  that is the same for all i (d h / 2, the forward kernel's normaliser, the divergence of the drift) cancel in the
  softmax and are dropped. A compartment never sees a row outside whose allowed set it is; every compartment runs at
  every step on the rows allowed to use it (no top-1), except rows it was pruned from (``PruneConfig``, an
  approximation, off by default) or whose class prior is zero. Rows are independent: a row's weights are the same
  in a batch as in a trajectory of its own (tested).
* Which estimator: ``estimator_for(scheduler)`` as ``CompartmentalPipeline`` steps it: Itô for DDPM and
  SDE-DPM-Solver++, divergence for DDIM (eta = 0) and DPM-Solver++; "ito" with a deterministic sampler and any other
  scheduler class are refused. ``DensityComposition.sampler`` makes one trajectory per sampling call.

Measured (tests/cdm/test_routing_density.py: 3 anisotropic Gaussian sources in 16 dims, cosine schedule, 64
trajectories, float64): total variation between the tracked and the exact posterior, max over rows and steps / mean.
The no-router baseline (w = priors) has mean 0.55.

    Itô, DDPM                        50 steps 0.16 / 0.011    200: 0.064 / 0.0038    1000: 0.032 / 0.0011
    Itô, SDE-DPM-Solver++            50 steps 0.22 / 0.015    200: 0.093 / 0.0037
    Itô, DDIM eta=0 / DPM-Solver++   refused (unchecked, a prototype measured 0.5-0.7 max at 50-1000 steps)
    divergence, DDIM eta=0           50 steps 0.063 / 0.0020  200: 0.037 / 0.00091  1000: 0.015 / 0.00042
      the same, 4 probes             50 steps 0.030 / 0.0011  (the one-probe Hutchinson noise dominates: O(N^-1/2))
      isotropic sources (exact probe) 50 steps 4.6e-3 / 3.8e-4  200: 2.1e-4 / 1.7e-5  (trapezoid rule: O(N^-2))
      the same with init="prior"     50 steps 0.13 / 0.0074   200: 0.028 / 0.0015   (the initial value's error)
    divergence, DPM-Solver++         20 steps 0.11 / 0.0031   50: 0.057 / 0.0017   100: 0.034 / 0.0011
    pruning (1e-3, 5 steps), DDPM    100 steps: 44% of evaluations skipped, error unchanged (0.111 / 0.0064);
                                     (0.05, 1 step): 54% skipped, max error 0.85: pruning too early is wrong for good.

Cost, per sampling step relative to one compartment (tiny 8x8 UNets, batch 64, K = 3, one loaded CPU thread, so
indicative only): Itô 3.2x (K passes; the bookkeeping is a few dot products), divergence 5.1x (K passes on 2N rows),
learnt router full 3.7x, learnt router top-1 1.5x. Density routing has no top-1: every compartment in S runs at every
step until pruned, because l_i must be tracked to know the weights.

Where it can break: (1) calls must come at strictly decreasing integer timesteps: Heun-type solvers (two calls at
one timestep) and fractional-timestep (Euler/Karras) schedulers are refused; the divergence estimator only needs the
points visited, so solvers with intermediate evaluations at decreasing timesteps should work, but that is untested.
(2) Itô on deterministic samplers: refused (use "divergence"). (3) DDPM's last steps inject less noise than the
forward process (beta_tilde < beta), a small Itô bias where the posterior is already nearly one-hot. (4)
Classifier-free guidance: each branch needs its own l_i (q_i(x | c) vs q_i(x)); ``sampler(guidance_scale=s)`` batches
[x; x] with labels [c; null] through one trajectory of 2N rows (cdm/guidance.py), which does exactly that, as rows are
independent (two-class isotropic sources, 100 DDPM steps, s = 3: TV max / mean 0.10 / 0.0032 conditional, 0.13 /
0.0065 null). (5) Compartments whose score is poor (few data, early training) give wrong densities with no learnt
correction; errors accumulate over the trajectory instead of being made afresh at every step as with a learnt
router. (6) fp16/bf16 eps: l is accumulated in float64 from dot products in at least float32, but the
finite-difference divergence needs float32 compartments.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from torch import nn

from cdm.compose import Allowed, Composed, TopK, check_class_priors, row_priors
from cdm.config import RoutingKind
from cdm.denoiser import ComposeOutput, Composer, expand_timesteps
from cdm.errors import ConfigError
from cdm.guidance import Guided, check_guidance_scale

if TYPE_CHECKING:
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

Estimator = Literal["ito", "divergence"]
Init = Literal["score", "prior"]

MIN_NOISE_RATIO = 0.5  # the Itô estimator refuses a sampler whose step carries less than this share of DDPM's noise


@dataclass(frozen=True)
class PruneConfig:
    """Drop compartment i for a row once its weight stayed below ``threshold`` for ``patience`` consecutive steps.

    An approximation: a pruned compartment is no longer evaluated on that row and its l_i is no longer tracked, so
    it can never come back; the row's weights renormalise over the compartments left. The row's most likely
    compartment is never pruned.
    """

    threshold: float = 1e-3  # weight below which a compartment counts as negligible for a row, in (0, 0.5)
    patience: int = 5  # consecutive steps below the threshold before it is dropped, >= 1

    def __post_init__(self) -> None:
        if not 0 < self.threshold < 0.5:
            raise ConfigError(f"prune threshold must be in (0, 0.5), got {self.threshold}")
        if self.patience < 1:
            raise ConfigError(f"prune patience must be >= 1 step, got {self.patience}")


@dataclass(frozen=True)
class DensityStep:
    """One denoiser call of a density trajectory; K columns in ``names`` order.

    eps: composed noise prediction (N, C, H, W). weights: (N, K) the w used, zeros outside S and where pruned.
    log_density: (N, K) float64 log lambda_i + l_i up to a per-row constant, -inf where not tracked.
    evaluated: (N, K) bool, which (row, compartment) pairs ran at this call. noise_ratio: the increment that led to
    this call, its squared distance from DDPM's posterior mean over DDPM's variance (~1 for stochastic samplers, well
    below for deterministic ones; None on the first call).
    """

    eps: torch.Tensor
    weights: torch.Tensor
    log_density: torch.Tensor
    evaluated: torch.Tensor
    noise_ratio: float | None


class DensityComposition(Composed):
    """The density kind: compartments composed with SuperDiff density weights; ``trajectory(n)`` (or ``sampler``)
    makes the stateful denoiser of one sampling call.

    Args:
        compartments: one Denoiser module per source, in ``names`` order.
        names: source names.
        alphas_cumprod: the training noise schedule (``scheduler.alphas_cumprod``), indexed by integer timestep.
        priors: lambda_i >= 0 in ``names`` order (default uniform); renormalised over each row's allowed set.
        class_priors: optional (K, num_classes) P(source i | class c) for labelled rows (label == num_classes, the
            null class, uses ``priors``); a zero entry means compartment i is never evaluated on rows of class c.
        subset: names of the sources this composition may use; None = all. Compartments outside S are never called.
        estimator: "ito" (stochastic samplers, K calls per step), "divergence" (any sampler, K calls on 2N rows) or
            "auto" (picked from the sampler by ``estimator_for``; a trajectory then needs the scheduler).
        init: "score" (first-order Gaussian log q_i^T from eps_i(x_T)) or "prior" (q_i^T = N(0, I)).
        prune: optional PruneConfig (approximation; off by default).
        fd_step: delta of the finite-difference divergence probe (estimator "divergence").
        probes: Hutchinson probes per row and step (estimator "divergence"): the probe noise, which dominates its
            error on non-diagonal Jacobians, falls as 1/probes; each compartment call then has (1 + probes) N rows.
    """

    kind: RoutingKind = "density"

    def __init__(
        self,
        compartments: Sequence[nn.Module],
        names: Sequence[str],
        alphas_cumprod: torch.Tensor,
        *,
        priors: Sequence[float] | torch.Tensor | None = None,
        class_priors: torch.Tensor | None = None,
        subset: Sequence[str] | None = None,
        estimator: Estimator | Literal["auto"] = "ito",
        init: Init = "score",
        prune: PruneConfig | None = None,
        fd_step: float = 1e-3,
        probes: int = 1,
    ) -> None:
        super().__init__(compartments, names, subset)
        k = len(self.source_names)
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()
        if abar.numel() < 2 or bool(((abar <= 0) | (abar >= 1)).any()) or bool((abar[1:] > abar[:-1]).any()):
            raise ConfigError("alphas_cumprod must be a decreasing schedule in (0, 1); pass scheduler.alphas_cumprod")
        self.alphas_cumprod = abar
        lam = torch.full((k,), 1.0 / k, dtype=torch.float64) if priors is None else torch.as_tensor(priors).double()
        if lam.shape != (k,) or bool((lam < 0).any()) or not bool(torch.isfinite(lam).all()):
            raise ConfigError(f"priors must be {k} finite non-negative numbers (one per source), got {lam.tolist()}")
        self.priors = lam
        self.class_priors = check_class_priors(class_priors, k)
        if float(self.priors[self.subset].sum()) <= 0:
            raise ConfigError(f"every source in the subset {[self.source_names[i] for i in self.subset]} has prior 0")
        if estimator not in ("ito", "divergence", "auto"):
            raise ConfigError(f"estimator {estimator!r} is not one of 'ito', 'divergence', 'auto'")
        if init not in ("score", "prior"):
            raise ConfigError(f"init {init!r} is not one of 'score', 'prior'")
        if not fd_step > 0:
            raise ConfigError(f"fd_step must be > 0, got {fd_step}")
        if probes < 1:
            raise ConfigError(f"probes must be >= 1 Hutchinson probe per step, got {probes}")
        self.estimator: Estimator | Literal["auto"] = estimator
        self.init: Init = init
        self.prune = prune
        self.fd_step = fd_step
        self.probes = probes

    @property
    def names(self) -> list[str]:
        """The source names (``source_names``)."""
        return self.source_names

    def row_priors(
        self,
        columns: Sequence[int],
        allowed: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        *,
        strict: bool = True,
    ) -> torch.Tensor:
        """(N, S) float64 lambda_i of each row over the sources ``columns`` (S of them): ``priors``, or for a row
        labelled c < num_classes ``class_priors[:, c]`` when there are class priors; zero where ``allowed`` (N, S)
        bool is False. Unnormalised (only ratios matter). ``strict``: ConfigError for a row with no positive prior
        (else such rows come back all zero for the caller to report)."""
        n, dev, cols = allowed.shape[0], allowed.device, list(columns)
        cp = self.class_priors.to(dev)[cols] if self.class_priors is not None else None  # (S, num_classes)
        lam = row_priors(self.priors.to(dev)[cols], cp, class_labels, n)
        lam = torch.where(allowed, lam, torch.zeros_like(lam))  # each row: its own allowed set
        empty = (~(lam > 0).any(1)).nonzero(as_tuple=True)[0]
        if strict and empty.numel():
            raise ConfigError(
                f"row {int(empty[0])} has prior 0 for every source it may use; check priors / class_priors / allowed"
            )
        return lam

    def trajectory(
        self,
        n: int,
        *,
        allowed: Allowed = None,
        generator: torch.Generator | None = None,
        scheduler: SchedulerMixin | None = None,
    ) -> DensityTrajectory:
        """A fresh denoiser for one sampling call of ``n`` rows (its l_i start at the first call).

        Args:
            n: rows per call.
            allowed: per-row allowed sources (None = this composition's subset, names, or a (N, K) bool mask).
            generator: draws the divergence estimator's probes.
            scheduler: the sampler the trajectory will follow: picks the estimator when it is "auto" and refuses
                one that does not fit it (``estimator_for``).
        """
        if n < 1:
            raise ConfigError(f"a trajectory needs at least one row, got n = {n}")
        if scheduler is not None:
            estimator = estimator_for(scheduler, self.estimator)
        elif self.estimator == "auto":
            raise ConfigError("estimator 'auto' picks from the sampler: pass the scheduler to trajectory()")
        else:
            estimator = self.estimator
        return DensityTrajectory(self, n, generator, self.allowed(allowed, n), estimator)

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
        """One trajectory for one sampling call (of 2N rows under guidance: each branch its own log-densities)."""
        if top_k is not None:
            raise ConfigError(
                f"top_k = {top_k!r} does not apply to density routing: every allowed compartment runs at every step "
                "to track its log-density; use top_k = None (or the learnt router, or pruning)"
            )
        scale = check_guidance_scale(guidance_scale)
        mask = self.allowed(allowed, n)
        if scale == 1.0:
            return self.trajectory(n, allowed=mask, generator=generator, scheduler=scheduler)
        inner = self.trajectory(2 * n, allowed=mask.repeat(2, 1), generator=generator, scheduler=scheduler)
        return Guided(inner, scale, self.num_classes)


def estimator_for(scheduler: SchedulerMixin, preference: Estimator | Literal["auto"] = "auto") -> Estimator:
    """The density estimator for a diffusers sampler as ``CompartmentalPipeline`` steps it: "ito" for the stochastic
    ones (DDPM, SDE-DPM-Solver++), "divergence" for the deterministic ones (DDIM with eta = 0, DPM-Solver++).
    ``preference`` "divergence" is valid with any of them, "ito" only with a stochastic one."""
    name = type(scheduler).__name__
    if isinstance(scheduler, DDPMScheduler):
        stochastic = True
    elif isinstance(scheduler, DDIMScheduler):
        stochastic = False  # the pipeline steps DDIM with eta = 0
    elif isinstance(scheduler, DPMSolverMultistepScheduler):
        stochastic = str(scheduler.config.algorithm_type).startswith("sde-")
    else:
        raise ConfigError(
            f"density routing cannot follow {name}: it needs one call per step at decreasing integer timesteps; use "
            "DDPMScheduler, DDIMScheduler or DPMSolverMultistepScheduler (make_scheduler 'ddpm', 'ddim', 'dpm')"
        )
    if preference == "auto":
        return "ito" if stochastic else "divergence"
    if preference == "ito" and not stochastic:
        raise ConfigError(
            f"the Itô density estimator needs a stochastic sampler but {name} is deterministic as the pipeline steps "
            "it; use estimator 'divergence' (or 'auto'), or sample with DDPM / SDE-DPM-Solver++"
        )
    if preference not in ("ito", "divergence"):
        raise ConfigError(f"estimator {preference!r} is not one of 'ito', 'divergence', 'auto'")
    return preference


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Inner products over the last (flattened sample) dim, summed in at least float32, returned in float64."""
    acc = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    return (a.to(acc) * b.to(acc)).sum(-1).double()


class DensityTrajectory:
    """The stateful denoiser of one sampling call: call it once per step, at decreasing timesteps.

    Each call evaluates eps_i (and the divergence probe) for every compartment in S on its active rows, advances
    l_i from the previous call's point to this one, and returns sum_i w_i eps_i; ``step`` also returns the weights.
    ``step`` is ``plan`` (the compartment calls the step needs) then ``finish`` (the state update from their
    outputs), so a batcher can make the calls of many trajectories together, each compartment once.
    """

    def __init__(
        self,
        comp: DensityComposition,
        n: int,
        generator: torch.Generator | None,
        allowed: torch.Tensor,
        estimator: Estimator,
    ) -> None:
        self.comp = comp
        self.n = n
        self.generator = generator
        self.estimator: Estimator = estimator
        self.calls = 0
        self.columns = allowed.any(0).nonzero(as_tuple=True)[0].tolist()  # S: the sources some row may use
        self._allowed = allowed[:, self.columns]  # (N, S)
        if comp.class_priors is None:  # (class priors are only known at the first call)
            positive = comp.priors[self.columns] > 0
            empty = (~(self._allowed & positive).any(1)).nonzero(as_tuple=True)[0]
            if empty.numel():
                raise ConfigError(f"row {int(empty[0])} has prior 0 for every source it may use; check priors, allowed")
        s = len(self.columns)
        self._l = torch.zeros((n, s), dtype=torch.float64)  # l_i = log q_i^t(x_t) + row constant, columns = S
        self._active = torch.ones((n, s), dtype=torch.bool)
        self._below = torch.zeros((n, s), dtype=torch.long)
        self._log_prior = torch.zeros((n, s), dtype=torch.float64)
        self._prev: _Point | None = None
        self._sampler_checked = False
        self._planned: DensityPlan | None = None  # plan() made, finish() not yet

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.step(x_t, t, class_labels).eps

    def compose(self, x_t: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> ComposeOutput:
        """One sampling step as a Composer: eps and the (N, K) weights."""
        out = self.step(x_t, t, class_labels)
        return ComposeOutput(out.eps, out.weights)

    @torch.no_grad()
    def step(self, x_t: torch.Tensor, t: torch.Tensor | int, class_labels: torch.Tensor | None = None) -> DensityStep:
        """One sampling step: eps, the weights used and which compartments ran (see DensityStep)."""
        plan = self.plan(x_t, t, class_labels)
        return self.finish(plan, [self.comp.compartments[c.index](c.x, c.t, c.class_labels) for c in plan.calls])

    @torch.no_grad()
    def plan(self, x_t: torch.Tensor, t: torch.Tensor | int, class_labels: torch.Tensor | None = None) -> DensityPlan:
        """The first half of ``step``: the compartment calls this step needs, without making them.

        A cross-request batcher (sampler/batching.py) plans the step of every trajectory it runs, evaluates each
        compartment once on the concatenation of their calls, and hands each trajectory its outputs (``finish``).
        The divergence estimator's probes are drawn here, from this trajectory's generator.
        """
        if x_t.shape[0] != self.n:
            raise ConfigError(f"this trajectory has {self.n} rows but got x_t with {x_t.shape[0]}; one per call")
        if self._planned is not None:
            raise ConfigError("this trajectory has a planned step that was never finished; finish() it first")
        tt = self._timesteps(t, x_t.device)
        if self._prev is None:
            self._start(x_t, class_labels)
        comp = self.comp
        v = None  # (P, N, ...) Rademacher probes, shared by every compartment
        if self.estimator == "divergence":
            bits = torch.randint(0, 2, (comp.probes, *x_t.shape), generator=self.generator)
            v = (2 * bits - 1).to(device=x_t.device, dtype=x_t.dtype)
        calls = []
        for j, i in enumerate(self.columns):
            rows = self._active[:, j].nonzero(as_tuple=True)[0]
            if rows.numel() == 0:
                continue  # pruned from every row: not called at all
            everyone = rows.numel() == self.n
            x, tr = (x_t, tt) if everyone else (x_t[rows], tt[rows])
            c = class_labels if (everyone or class_labels is None) else class_labels[rows]
            if v is not None:  # the probe rows x + delta v in the same call
                vr = v if everyone else v[:, rows]
                reps = 1 + comp.probes
                x = torch.cat([x, (x + comp.fd_step * vr).flatten(0, 1)])
                tr, c = tr.repeat(reps), None if c is None else c.repeat(reps)
            calls.append(CompartmentCall(i, j, rows, x, tr, c))
        plan = DensityPlan(x_t, tt, v, tuple(calls))
        self._planned = plan
        return plan

    @torch.no_grad()
    def finish(self, plan: DensityPlan, outputs: Sequence[torch.Tensor]) -> DensityStep:
        """The second half of ``step``: advance the log-densities with the outputs of ``plan``'s calls (in order)."""
        if plan is not self._planned:
            raise ConfigError("finish() takes the plan this trajectory made last; plan() the step first")
        if len(outputs) != len(plan.calls):
            raise ConfigError(f"the plan has {len(plan.calls)} compartment calls but {len(outputs)} outputs came back")
        self._planned = None
        comp = self.comp
        x_t, tt = plan.x_t, plan.t
        abar = comp.alphas_cumprod.to(x_t.device)[tt]  # (N,) float64
        # 1. every compartment in S on its active rows (and, for "divergence", the probe rows in the same call)
        eps_s = torch.zeros((len(self.columns), *x_t.shape), dtype=x_t.dtype, device=x_t.device)
        v = plan.probes
        div_s = None if v is None else torch.zeros((len(self.columns), self.n), dtype=torch.float64, device=x_t.device)
        for call, both in zip(plan.calls, outputs, strict=True):
            rows, j = call.rows, call.column
            if v is None or div_s is None:
                out = both
            else:
                vr = v if rows.numel() == self.n else v[:, rows]
                out = both[: len(rows)]
                shifted = both[len(rows) :].view(comp.probes, *out.shape)
                diff = (shifted - out).flatten(2)  # (P, rows, D)
                div_s[j, rows] = _dot(vr.flatten(2), diff).mean(0) / comp.fd_step
            eps_s[j, rows] = out
        x = x_t.flatten(1)
        score = -eps_s.flatten(2) / (1 - abar).sqrt().to(x.dtype)[:, None]  # (S, N, D)
        here = _Point(x, tt, abar, score, div_s)
        # 2. advance l_i from the previous call's point, or start it
        noise_ratio = None
        if self._prev is None:
            if comp.init == "score":
                self._l = -0.5 * _dot(eps_s.flatten(2), eps_s.flatten(2)).T
        else:
            noise_ratio = self._advance(self._prev, here)
        # 3. weights over S (active rows only), composed eps
        logits = torch.where(self._active, self._log_prior + self._l, -math.inf)
        w_s = torch.softmax(logits, dim=1)
        here.weights = w_s
        self._prev = here
        eps = torch.einsum("ns,sn...->n...", w_s.to(x_t.dtype), eps_s)
        k = len(comp.source_names)
        weights = torch.zeros((self.n, k), dtype=torch.float64, device=x_t.device)
        log_density = torch.full((self.n, k), -math.inf, dtype=torch.float64, device=x_t.device)
        evaluated = torch.zeros((self.n, k), dtype=torch.bool, device=x_t.device)
        weights[:, self.columns] = w_s
        log_density[:, self.columns] = logits
        evaluated[:, self.columns] = self._active
        # 4. optional pruning: rows drop compartments that stayed negligible, never their most likely one
        if comp.prune is not None:
            low = (w_s < comp.prune.threshold) & self._active
            self._below = torch.where(low, self._below + 1, torch.zeros_like(self._below))
            drop = self._below >= comp.prune.patience
            drop[torch.arange(self.n, device=drop.device), w_s.argmax(1)] = False
            self._active = self._active & ~drop
        self.calls += 1
        return DensityStep(eps, weights, log_density, evaluated, noise_ratio)

    def _timesteps(self, t: torch.Tensor | int, device: torch.device) -> torch.Tensor:
        raw = torch.as_tensor(t)
        if raw.is_floating_point() and bool((raw != raw.round()).any()):
            raise ConfigError(f"density routing needs integer diffusers timesteps, got {raw.flatten()[:4].tolist()}")
        tt = expand_timesteps(raw, self.n, device)
        top = len(self.comp.alphas_cumprod) - 1
        if bool(((tt < 0) | (tt > top)).any()):
            raise ConfigError(f"timesteps must be in [0, {top}], got {int(tt.min())}..{int(tt.max())}")
        if self._prev is not None and bool((tt >= self._prev.t).any()):
            raise ConfigError(
                f"timestep {int(tt.max())} does not decrease from the previous call's {int(self._prev.t.max())}: a "
                "density trajectory needs exactly one call per sampling step (no Heun / singlestep solvers); make a "
                "new trajectory for each sampling call"
            )
        return tt

    def _start(self, x_t: torch.Tensor, class_labels: torch.Tensor | None) -> None:
        dev = x_t.device
        lam = self.comp.row_priors(self.columns, self._allowed.to(dev), class_labels)
        self._log_prior = lam.log()
        self._active = lam > 0
        self._l = self._l.to(dev)
        self._below = self._below.to(dev)

    def _advance(self, p: _Point, q: _Point) -> float:
        """l_i += the estimator's increment from point p (previous call) to q (this call); returns the noise ratio."""
        dx = q.x - p.x
        h = q.abar.log() - p.abar.log()  # = lambda_k - lambda_{k+1} > 0
        # sampler check: realised noise around DDPM's posterior mean (shared by DDIM eta=1 and SDE-DPM-Solver++) over
        # its variance beta_tilde, with the composed eps of p; ~1 for those, (1 - sqrt(1 - b))^2 / b for a deterministic
        # sampler, b = beta_tilde / (1 - abar_{k+1}), which tells them apart (< 1/2) once b < 0.9
        assert p.weights is not None
        alpha = p.abar / q.abar
        beta_tilde = (1 - alpha) * (1 - q.abar) / (1 - p.abar)
        sig0 = (1 - p.abar).sqrt()
        eps_bar = -sig0[:, None] * torch.einsum("ns,snd->nd", p.weights, p.score.double())
        x0hat = (p.x.double() - sig0[:, None] * eps_bar) / p.abar.sqrt()[:, None]
        mean = (q.abar.sqrt() * (1 - alpha) / (1 - p.abar))[:, None] * x0hat
        mean = mean + (alpha.sqrt() * (1 - q.abar) / (1 - p.abar))[:, None] * p.x.double()
        resid = q.x.double() - mean
        noise_ratio = float((_dot(resid, resid) / (beta_tilde * dx.shape[1])).mean())
        informative = bool((beta_tilde < 0.9 * (1 - q.abar)).all())
        if self.estimator == "ito":
            if not self._sampler_checked and informative:
                self._sampler_checked = True
                if noise_ratio < MIN_NOISE_RATIO:
                    raise ConfigError(
                        f"the sampler's step carried {noise_ratio:.3f} of DDPM's noise variance (needs >= "
                        f"{MIN_NOISE_RATIO}): the Itô density estimator needs a stochastic sampler (DDPM, DDIM eta=1, "
                        "SDE-DPM-Solver++); use estimator='divergence' for DDIM eta=0 or DPM-Solver++"
                    )
            inc = _dot(p.score, dx) - 0.5 * h * (_dot(p.score, p.x) + _dot(p.score, p.score))
        else:
            assert p.div is not None and q.div is not None
            r0, r1 = (p.abar / (1 - p.abar)).sqrt(), (q.abar / (1 - q.abar)).sqrt()
            f0 = 0.5 * (_dot(p.score, p.x) + _dot(p.score, p.score) - p.div / (1 - p.abar).sqrt())
            f1 = 0.5 * (_dot(q.score, q.x) + _dot(q.score, q.score) - q.div / (1 - q.abar).sqrt())
            j0, j1 = -2 / (r0 * (1 + r0**2)), -2 / (r1 * (1 + r1**2))  # d lambda / d r
            inc = 0.5 * _dot(p.score + q.score, dx) + 0.5 * (r1 - r0) * (f0 * j0 + f1 * j1)
        self._l = self._l + inc.T
        return noise_ratio


@dataclass(frozen=True)
class CompartmentCall:
    """One compartment call a density step needs: compartment ``index`` (a column of the composition's names, ``column``
    of the trajectory's S) on the trajectory's ``rows``; its input batch (x, t, class_labels) holds those rows and,
    for the divergence estimator, the probe rows after them."""

    index: int
    column: int
    rows: torch.Tensor
    x: torch.Tensor
    t: torch.Tensor
    class_labels: torch.Tensor | None


@dataclass(frozen=True)
class DensityPlan:
    """The calls of one planned step (``DensityTrajectory.plan``) and what ``finish`` needs to complete it."""

    x_t: torch.Tensor
    t: torch.Tensor  # (N,) long
    probes: torch.Tensor | None  # (P, N, ...) Rademacher probes of the divergence estimator
    calls: tuple[CompartmentCall, ...]


@dataclass
class _Point:
    """What a call leaves for the next one: flattened x (N, D), t, abar (N,), scores (S, N, D), div eps (S, N)."""

    x: torch.Tensor
    t: torch.Tensor
    abar: torch.Tensor
    score: torch.Tensor
    div: torch.Tensor | None
    weights: torch.Tensor | None = None  # (N, S) the weights used at this point
