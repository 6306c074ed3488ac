"""Density routing (SuperDiff) on an analytic Gaussian mixture: the tracked weights converge to the exact posterior.

Three anisotropic Gaussian sources N(mu_i, C_i) in 16 dims pushed through the cosine VP schedule have exact eps and
exact noised marginals, so at every step of a trajectory sampled with the density composition we compare its weights
with the exact mixture posterior over S and its eps with the exact mixture eps (autograd of the mixture's log density).

Tolerances. Both estimators are exact in continuous time (the Itô one by Itô's formula on reverse-SDE paths, the
divergence one because l_i is a state function integrated along the path actually taken); what is left is the
discretisation's error, so the tests assert that it shrinks with the number of steps at the predicted rate, plus
absolute bounds about 2x the values measured at these fixed seeds (deterministic: fixed generators, float64).
- Itô: the strong Euler-Maruyama error of the log-density SDE. Itô's formula accounts for the mean of the per-step
  second-order term h (z^T H z) / 2 but the scheme drops its fluctuation, a random walk of O(N^-1/2), plus a
  deterministic O(1/N): 1000 steps must beat 50 by at least sqrt(20) ~ 4.5x (measured 10x).
- Divergence: the trapezoid rule in r = sqrt(SNR) is O(N^-2) (isotropic sources, whose diagonal Jacobians a Rademacher
  probe measures exactly: 200 steps must beat 50 by 10x, theory 16x, measured 22x); on full covariances the one-probe
  Hutchinson noise, a random walk again, dominates: O(N^-1/2), 1000 steps must beat 50 by 3x (theory 4.5x).
The no-router baseline (w = the priors over S) has a mean TV of 0.36-0.56 here, and the subset tests assert the
estimator is 10x below it, so none of the bounds is met trivially.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from torch import nn

from cdm.errors import ConfigError
from cdm.routing.density import DensityComposition, PruneConfig

SHAPE = (1, 4, 4)
D = 16
N = 64
SCHEDULE = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2", "prediction_type": "epsilon"}
ABAR = DDPMScheduler(**SCHEDULE).alphas_cumprod.double()
NAMES = ["a", "b", "c"]
PRIORS = [0.5, 0.3, 0.2]


class GaussianCompartment(nn.Module):
    """x_0 ~ N(mu, C): x_t ~ N(sqrt(a) mu, V_t = a C + (1 - a) I), exact eps = sigma_t V_t^-1 (x_t - sqrt(a) mu)."""

    def __init__(self, mu: torch.Tensor, cov: torch.Tensor) -> None:
        super().__init__()
        self.mu = mu
        v = ABAR[:, None, None] * cov + (1 - ABAR)[:, None, None] * torch.eye(D, dtype=torch.float64)
        self.prec = torch.linalg.inv(v)  # (1000, D, D)
        self.logdet = torch.linalg.slogdet(v).logabsdet
        self.calls = 0
        self.rows = 0
        self.last: torch.Tensor | None = None  # the rows of the last call

    def _centred(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) - ABAR[t].sqrt()[:, None] * self.mu

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        self.calls += 1
        self.rows += x_t.shape[0]
        self.last = x_t
        return self.exact(x_t, t)

    def exact(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The exact eps, without counting a call (for the references)."""
        t = t.long().expand(x_t.shape[0])
        eps = (1 - ABAR[t]).sqrt()[:, None] * self._apply_prec(self._centred(x_t, t), t)
        return eps.view_as(x_t)

    def _apply_prec(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if bool((t == t[0]).all()):  # one timestep for the batch (the samplers): one matrix product
            return z @ self.prec[t[0]]  # the precision is symmetric
        return torch.einsum("nij,nj->ni", self.prec[t], z)

    def log_marginal(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        z = self._centred(x_t, t)
        quad = (z * self._apply_prec(z, t)).sum(1)
        return -0.5 * quad - 0.5 * self.logdet[t] - 0.5 * D * math.log(2 * math.pi)


def make_mixture(isotropic: bool = False) -> list[GaussianCompartment]:
    """Three sources, scales 0.3, 0.6, 1.0; full covariances (non-diagonal Jacobians) unless ``isotropic``."""
    g = torch.Generator().manual_seed(0)
    comps = []
    for s in (0.3, 0.6, 1.0):
        mu = torch.randn(D, generator=g, dtype=torch.float64) * 1.5
        a = torch.randn((D, D), generator=g, dtype=torch.float64) * s / math.sqrt(D)
        cov = s**2 * torch.eye(D, dtype=torch.float64) if isotropic else a @ a.T + (0.1 * s) ** 2 * torch.eye(D)
        comps.append(GaussianCompartment(mu, cov.double()))
    return comps


def exact_log_posterior(comps, priors, subset, x, t) -> torch.Tensor:
    """log P(i | x_t) over ``subset`` (priors renormalised over it) as a full (N, K) tensor, -inf outside."""
    out = torch.full((x.shape[0], len(comps)), -math.inf, dtype=torch.float64)
    cols = torch.stack([math.log(priors[i]) + comps[i].log_marginal(x, t) for i in subset], 1)
    out[:, subset] = torch.log_softmax(cols, 1)
    return out


def mixture_eps(comps, priors, subset, x, t) -> torch.Tensor:
    """eps* = -sigma_t grad log p(x_t) of the sub-mixture over ``subset``, by autograd (independent of the weights)."""
    xr = x.clone().requires_grad_(True)
    with torch.enable_grad():
        logs = torch.stack([math.log(priors[i]) + comps[i].log_marginal(xr, t) for i in subset], 1)
        (grad,) = torch.autograd.grad(torch.logsumexp(logs, 1).sum(), xr)
    return -(1 - ABAR[t]).sqrt().view(-1, 1, 1, 1) * grad


@dataclass
class Errors:
    tv_max: float  # max over rows and steps of the total variation between tracked and exact posterior
    tv_mean: float
    eps_max: float  # max relative error |eps - eps*| / |eps*| of the composed eps
    evaluated: float  # share of (row, compartment in S, step) evaluations that ran
    baseline_tv_mean: float  # the same mean for the no-router baseline w = priors renormalised over S


def run(comp: DensityComposition, comps, scheduler, steps: int, *, priors=PRIORS, step_kwargs=None) -> Errors:
    """Sample N trajectories with the density composition, comparing with the exact mixture at every step."""
    gen = torch.Generator().manual_seed(1)
    scheduler.set_timesteps(steps)
    x = torch.randn((N, *SHAPE), generator=gen, dtype=torch.float64) * scheduler.init_noise_sigma
    traj = comp.trajectory(N, generator=torch.Generator().manual_seed(2))
    tv, rel, ran, base = [], [], [], []
    prior_w = torch.zeros(len(comps), dtype=torch.float64)
    prior_w[comp.subset] = torch.tensor(priors, dtype=torch.float64)[comp.subset]
    prior_w /= prior_w.sum()
    for t in scheduler.timesteps:
        tt = t.long().expand(N)
        out = traj.step(x, tt)
        w_star = exact_log_posterior(comps, priors, comp.subset, x, tt).exp()
        # the exact mixture eps, sum_i w*_i eps_i (equal to autograd's at 1e-9: test_references_are_consistent)
        eps_star = sum(w_star[:, i].view(-1, 1, 1, 1) * comps[i].exact(x, tt) for i in comp.subset)
        tv.append(0.5 * (out.weights - w_star).abs().sum(1))
        base.append(0.5 * (prior_w - w_star).abs().sum(1))
        rel.append((out.eps - eps_star).flatten(1).norm(dim=1) / eps_star.flatten(1).norm(dim=1))
        ran.append(out.evaluated[:, comp.subset].double().mean())
        x = scheduler.step(out.eps, t, x, generator=gen, **(step_kwargs or {})).prev_sample
    tvs = torch.stack(tv)
    return Errors(
        float(tvs.max()),
        float(tvs.mean()),
        float(torch.stack(rel).max()),
        float(torch.stack(ran).mean()),
        float(torch.stack(base).mean()),
    )


def ddpm():
    return DDPMScheduler(**SCHEDULE, clip_sample=False)


def ddim():
    return DDIMScheduler(**SCHEDULE, clip_sample=False, set_alpha_to_one=False)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only add synchronisation (20 ms per softmax on a loaded 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def comps() -> list[GaussianCompartment]:
    return make_mixture()


def composition(comps, **kwargs) -> DensityComposition:
    return DensityComposition(comps, NAMES, ABAR, priors=PRIORS, **kwargs)


def test_references_are_consistent(comps):
    # the exact mixture eps is the exact-posterior-weighted sum of the exact component eps (CDM eq. 5)
    g = torch.Generator().manual_seed(3)
    x = torch.randn((N, *SHAPE), generator=g, dtype=torch.float64)
    t = torch.randint(0, 1000, (N,), generator=g)
    w = exact_log_posterior(comps, PRIORS, [0, 1, 2], x, t).exp()
    want = sum(w[:, i].view(-1, 1, 1, 1) * comps[i](x, t) for i in range(3))
    torch.testing.assert_close(mixture_eps(comps, PRIORS, [0, 1, 2], x, t), want, rtol=1e-9, atol=1e-9)
    sub = exact_log_posterior(comps, PRIORS, [0, 2], x, t).exp()
    want = sub[:, 0].view(-1, 1, 1, 1) * comps[0](x, t) + sub[:, 2].view(-1, 1, 1, 1) * comps[2](x, t)
    torch.testing.assert_close(mixture_eps(comps, PRIORS, [0, 2], x, t), want, rtol=1e-9, atol=1e-9)
    # and the exact marginals integrate the exact eps: finite differences of log q against -eps / sigma
    d = torch.zeros_like(x)
    d.view(N, -1)[:, 5] = 1e-6
    fd = (comps[1].log_marginal(x + d, t) - comps[1].log_marginal(x - d, t)) / 2e-6
    torch.testing.assert_close(fd, -comps[1](x, t).view(N, -1)[:, 5] / (1 - ABAR[t]).sqrt(), rtol=1e-6, atol=1e-6)


def test_composed_eps_is_the_weighted_sum_of_the_compartments(comps):
    traj = composition(comps).trajectory(N)
    x = torch.randn((N, *SHAPE), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    for t in (999, 998):
        out = traj.step(x, torch.tensor(t))
        want = sum(out.weights[:, i].view(-1, 1, 1, 1) * comps[i](x, torch.tensor(t)) for i in range(3))
        torch.testing.assert_close(out.eps, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out.weights.sum(1), torch.ones(N, dtype=torch.float64))
        torch.testing.assert_close(out.weights, out.log_density.softmax(1))


def test_ito_on_ddpm_converges_to_the_exact_posterior(comps):
    errs = {s: run(composition(comps), comps, ddpm(), s) for s in (50, 200, 1000)}
    print({s: (round(e.tv_max, 4), round(e.tv_mean, 5), round(e.eps_max, 4)) for s, e in errs.items()})
    assert errs[50].tv_mean > errs[200].tv_mean > errs[1000].tv_mean
    assert errs[50].tv_max > errs[200].tv_max > errs[1000].tv_max
    assert errs[1000].tv_mean < errs[50].tv_mean / math.sqrt(20)  # at least the strong O(N^-1/2) rate
    assert errs[1000].tv_max < 0.065 and errs[1000].tv_mean < 2.2e-3 and errs[1000].eps_max < 0.065
    assert errs[50].tv_max < 0.32 and errs[50].tv_mean < 0.022
    assert all(e.evaluated == 1.0 for e in errs.values())  # every compartment at every step: no top-1


def test_ito_with_other_stochastic_samplers_and_drifts(comps):
    # DDIM with eta = 1 takes the DDPM posterior step: same noise, same estimator error
    eta1 = run(composition(comps), comps, ddim(), 50, step_kwargs={"eta": 1.0})
    assert eta1.tv_max < 0.32 and eta1.tv_mean < 0.022
    # any drift: clipping x0 to [-1, 1] (the project's DDPM) pushes the samples off the mixture; the weights still
    # follow the exact posterior at the points actually visited
    clipped = run(composition(comps), comps, DDPMScheduler(**SCHEDULE, clip_sample=True), 200)
    print("clipped", clipped)
    assert clipped.tv_max < 0.22 and clipped.tv_mean < 0.011
    sde = DPMSolverMultistepScheduler(**SCHEDULE, algorithm_type="sde-dpmsolver++", solver_order=2, steps_offset=1)
    errs = {s: run(composition(comps), comps, sde, s) for s in (50, 200)}
    print({s: (round(e.tv_max, 4), round(e.tv_mean, 5)) for s, e in errs.items()})
    assert errs[200].tv_mean < errs[50].tv_mean / 2 and errs[200].tv_max < 0.19 and errs[200].tv_mean < 0.0075


@pytest.mark.parametrize(
    "scheduler",
    [
        DDIMScheduler(**SCHEDULE, clip_sample=False, set_alpha_to_one=False),
        DDIMScheduler(**SCHEDULE, clip_sample=True, set_alpha_to_one=False, timestep_spacing="trailing"),
        DPMSolverMultistepScheduler(**SCHEDULE, algorithm_type="dpmsolver++", solver_order=2, steps_offset=1),
    ],
    ids=["ddim-eta0", "ddim-eta0-clip-trailing", "dpm-solver++"],
)
def test_ito_refuses_a_deterministic_sampler(comps, scheduler):
    # the realised noise is ~0.1-0.35 of DDPM's at the first informative step, against ~1 for stochastic samplers
    with pytest.raises(ConfigError, match="stochastic sampler"):
        run(composition(comps), comps, scheduler, 50, step_kwargs={"eta": 0.0} if "DDIM" in str(scheduler) else {})


def test_divergence_estimator_on_ddim_converges(comps):
    # the error is the one-probe Hutchinson noise of div eps_i (non-diagonal Jacobians), a random walk: O(N^-1/2)
    errs = {s: run(composition(comps, estimator="divergence"), comps, ddim(), s) for s in (50, 200, 1000)}
    print({s: (round(e.tv_max, 5), round(e.tv_mean, 6), round(e.eps_max, 5)) for s, e in errs.items()})
    assert errs[50].tv_mean > errs[200].tv_mean > errs[1000].tv_mean
    assert errs[1000].tv_mean < errs[50].tv_mean / 3  # sqrt(20) ~ 4.5 in theory
    assert errs[50].tv_max < 0.13 and errs[1000].tv_max < 0.03 and errs[1000].tv_mean < 8.5e-4
    # more probes, less noise: the variance falls as 1 / probes
    four = run(composition(comps, estimator="divergence", probes=4), comps, ddim(), 50)
    print("probes=4", four)
    assert four.tv_mean < errs[50].tv_mean / 1.5


def test_divergence_quadrature_is_second_order_when_the_probe_is_exact():
    # isotropic sources: diagonal Jacobians, which a Rademacher probe measures exactly; what is left is the
    # trapezoid rule's O(N^-2), 16x less error for 4x the steps
    comps = make_mixture(isotropic=True)
    errs = {s: run(composition(comps, estimator="divergence"), comps, ddim(), s) for s in (50, 200)}
    print({s: (e.tv_max, e.tv_mean, e.eps_max) for s, e in errs.items()})
    assert errs[200].tv_mean < errs[50].tv_mean / 10 and errs[200].tv_max < errs[50].tv_max / 10
    assert errs[200].tv_max < 4e-4


def test_divergence_estimator_on_dpm_solver_and_ddpm(comps):
    dpm = DPMSolverMultistepScheduler(**SCHEDULE, algorithm_type="dpmsolver++", solver_order=2, steps_offset=1)
    errs = {s: run(composition(comps, estimator="divergence"), comps, dpm, s) for s in (20, 50, 100)}
    print({s: (e.tv_max, e.tv_mean) for s, e in errs.items()})
    assert errs[20].tv_mean > errs[50].tv_mean > errs[100].tv_mean and errs[100].tv_max < 0.07
    # on a stochastic sampler too (any path)
    sto = run(composition(comps, estimator="divergence"), comps, ddpm(), 100)
    print(sto)
    assert sto.tv_max < 0.27 and sto.tv_mean < 3.3e-3


@pytest.mark.parametrize("subset", [s for r in (1, 2, 3) for s in itertools.combinations(NAMES, r)])
def test_every_subset_matches_its_sub_mixture_and_never_calls_outside(subset):
    comps = make_mixture()  # fresh call counters
    comp = composition(comps, subset=list(subset))
    steps = 50
    errs = run(comp, comps, ddpm(), steps)
    print(subset, errs)
    for i, name in enumerate(NAMES):
        if name in subset:
            assert comps[i].calls == steps and comps[i].rows == steps * N  # once per step, on every row
        else:
            assert comps[i].calls == 0, f"compartment {name} outside the access subset was evaluated"
    if len(subset) == 1:  # one source: weight 1, eps exactly the compartment's
        assert errs.tv_max == 0 and errs.eps_max < 1e-9
    else:
        assert errs.tv_max < 0.44 and errs.tv_mean < 0.022  # at 50 steps
        assert errs.tv_mean < errs.baseline_tv_mean / 10  # far from the no-router baseline


def test_divergence_estimator_subset_calls_each_compartment_once_per_step_on_twice_the_rows():
    comps = make_mixture()
    errs = run(composition(comps, estimator="divergence", subset=["a", "c"]), comps, ddim(), 50)
    assert comps[1].calls == 0
    assert comps[0].calls == comps[2].calls == 50 and comps[0].rows == 50 * 2 * N
    assert errs.tv_max < 0.12 and errs.tv_mean < 2.5e-3


def test_pruning_saves_evaluations_at_a_measured_cost(comps):
    full = run(composition(comps), comps, ddpm(), 100)
    pruned = run(composition(comps, prune=PruneConfig(threshold=1e-3, patience=5)), comps, ddpm(), 100)
    aggressive = run(composition(comps, prune=PruneConfig(threshold=0.05, patience=1)), comps, ddpm(), 100)
    print("full", full, "\npruned", pruned, "\naggressive", aggressive)
    assert pruned.evaluated < 0.75  # a quarter of the evaluations saved or more
    assert pruned.tv_mean < full.tv_mean + 1e-3 and pruned.tv_max < full.tv_max + 0.01  # ...at no visible cost
    assert aggressive.evaluated < pruned.evaluated and aggressive.tv_mean > pruned.tv_mean  # the trade-off is real


def test_pruned_compartments_are_not_evaluated_on_pruned_rows():
    comps = make_mixture()
    comp = composition(comps, prune=PruneConfig(threshold=1e-3, patience=2))
    sched = ddpm()
    sched.set_timesteps(100)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn((N, *SHAPE), generator=gen, dtype=torch.float64)
    traj = comp.trajectory(N)
    ran = torch.zeros(3)
    for t in sched.timesteps:
        out = traj.step(x, t)
        assert torch.all(out.weights[~out.evaluated] == 0)
        ran += out.evaluated.sum(0)
        x = sched.step(out.eps, t, x, generator=gen).prev_sample
    assert [c.rows for c in comps] == ran.long().tolist()
    assert ran.sum() < 0.75 * 100 * N * 3


def test_class_priors_zero_means_never_evaluated_on_that_class(comps):
    class_priors = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])  # P(i | c) up to a constant, 2 classes
    comps = make_mixture()
    comp = composition(comps, class_priors=class_priors)
    labels = torch.tensor([0, 1, 2, 2] * (N // 4))  # 2 = the null class: uses the source priors
    sched = ddpm()
    sched.set_timesteps(50)
    gen = torch.Generator().manual_seed(6)
    x = torch.randn((N, *SHAPE), generator=gen, dtype=torch.float64)
    traj = comp.trajectory(N)
    tv = []
    for t in sched.timesteps:
        out = traj.step(x, t, labels)
        assert torch.all(out.weights[labels == 0, 2] == 0) and torch.all(out.weights[labels == 1, 0] == 0)
        assert torch.all(out.evaluated[labels == 2])
        # class-0 rows follow the {a, b} mixture at P(a | 0) = P(b | 0) = 1/2
        w_star = exact_log_posterior(comps, [0.5, 0.5, 1.0], [0, 1], x, t.long().expand(N)).exp()
        tv.append(0.5 * (out.weights - w_star).abs().sum(1)[labels == 0])
        x = sched.step(out.eps, t, x, generator=gen).prev_sample
    assert comps[0].rows == comps[2].rows == 50 * (N * 3 // 4) and comps[1].rows == 50 * N
    print("class-0 rows", float(torch.stack(tv).max()), float(torch.stack(tv).mean()))
    assert float(torch.stack(tv).max()) < 0.22 and float(torch.stack(tv).mean()) < 0.016


def test_bad_calls_and_options_are_rejected(comps):
    traj = composition(comps).trajectory(N)
    x = torch.zeros((N, *SHAPE), dtype=torch.float64)
    traj.step(x, torch.tensor(500))
    with pytest.raises(ConfigError, match="does not decrease"):
        traj.step(x, torch.tensor(500))
    with pytest.raises(ConfigError, match="rows"):
        traj.step(x[:3], torch.tensor(400))
    with pytest.raises(ConfigError, match="integer"):
        composition(comps).trajectory(N).step(x, torch.tensor(499.5))
    with pytest.raises(ConfigError, match=r"\[0, 999\]"):
        composition(comps).trajectory(N).step(x, torch.tensor(1000))
    with pytest.raises(ConfigError, match="unknown source"):
        composition(comps, subset=["zzz"])
    with pytest.raises(ConfigError, match="empty"):
        composition(comps, subset=[])
    with pytest.raises(ConfigError, match="priors"):
        DensityComposition(comps, NAMES, ABAR, priors=[1.0, -1.0, 1.0])
    with pytest.raises(ConfigError, match="prior 0"):
        DensityComposition(comps, NAMES, ABAR, priors=[1.0, 0.0, 0.0], subset=["b", "c"])
    with pytest.raises(ConfigError, match="estimator"):
        composition(comps, estimator="top1")
    with pytest.raises(ConfigError, match="alphas_cumprod"):
        DensityComposition(comps, NAMES, ABAR.flip(0))
    with pytest.raises(ConfigError, match="threshold"):
        PruneConfig(threshold=0.7)
    with pytest.raises(ConfigError, match="patience"):
        PruneConfig(patience=0)


SUBSETS = [list(s) for r in (1, 2, 3) for s in itertools.combinations(range(3), r)]


def test_per_row_masks_track_each_rows_own_posterior_and_equal_separate_trajectories():
    # row n may use SUBSETS[n % 7]: seven allowed sets in one batch, as the cross-request batcher will send them
    comps = make_mixture()
    comp = composition(comps)
    row_sets = [SUBSETS[n % len(SUBSETS)] for n in range(N)]
    mask = torch.zeros((N, 3), dtype=torch.bool)
    for n, s in enumerate(row_sets):
        mask[n, s] = True
    groups = {tuple(s): torch.tensor([n for n in range(N) if row_sets[n] == s]) for s in SUBSETS}
    sched = ddpm()
    sched.set_timesteps(50)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn((N, *SHAPE), generator=gen, dtype=torch.float64)
    traj = comp.trajectory(N, allowed=mask)
    alone = {s: composition(comps, subset=[NAMES[i] for i in s]).trajectory(len(rows)) for s, rows in groups.items()}
    tv, base = [], []
    for t in sched.timesteps:
        before = [c.rows for c in comps]
        calls = [c.calls for c in comps]
        out = traj.step(x, t)
        for i, c in enumerate(comps):
            assert c.calls == calls[i] + 1, "one call per compartment per step"
            assert c.rows - before[i] == int(mask[:, i].sum()), "a compartment ran on rows outside their allowed set"
            assert torch.equal(c.last, x[mask[:, i]]), "a compartment saw a row that may not use it"
        assert torch.all(out.weights[~mask] == 0) and torch.equal(out.evaluated, mask)
        tt = t.long().expand(N)
        for s, rows in groups.items():
            # the same rows in a trajectory of their own, at the same points: the same weights and eps
            sep = alone[s].step(x[rows], t)
            torch.testing.assert_close(out.weights[rows], sep.weights, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(out.eps[rows], sep.eps, rtol=1e-10, atol=1e-12)
            if len(s) > 1:
                w_star = exact_log_posterior(comps, PRIORS, list(s), x[rows], tt[rows]).exp()
                tv.append(0.5 * (out.weights[rows] - w_star).abs().sum(1))
                prior_w = torch.zeros(3, dtype=torch.float64)
                prior_w[list(s)] = torch.tensor(PRIORS, dtype=torch.float64)[list(s)]
                base.append(0.5 * (prior_w / prior_w.sum() - w_star).abs().sum(1))
            else:
                assert torch.all(out.weights[rows, s[0]] == 1)
        x = sched.step(out.eps, t, x, generator=gen).prev_sample
    tv_all, base_all = torch.cat(tv), torch.cat(base)
    print("per-row masks, 50 DDPM steps: tv max / mean", float(tv_all.max()), float(tv_all.mean()))
    # measured 0.21 / 0.0094; the bounds of the every-subset test at 50 steps
    assert float(tv_all.max()) < 0.44 and float(tv_all.mean()) < 0.022
    assert float(tv_all.mean()) < float(base_all.mean()) / 10


def labelled_mixture():
    """Two-class isotropic sources (tests/cdm/gaussians.py): exact eps and marginals for y = c and y = null."""
    from tests.cdm.gaussians import make_sources

    comps = make_sources(classes=2)
    # P(source i | class c) up to a constant: lambda_i P(c | i)
    class_priors = torch.tensor([[PRIORS[i] * float(p) for p in c.log_pis.exp()] for i, c in enumerate(comps)])
    return comps, class_priors


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_guidance_branches_track_their_own_posteriors(scale):
    from tests.cdm.gaussians import exact_posterior, mixture_eps

    comps, class_priors = labelled_mixture()
    comp = DensityComposition(comps, NAMES, ABAR, priors=PRIORS, class_priors=class_priors, estimator="auto")
    sched = ddpm()
    steps = 100
    sched.set_timesteps(steps)
    gen = torch.Generator().manual_seed(8)
    x = torch.randn((N, *SHAPE), generator=gen, dtype=torch.float64)
    labels = torch.tensor([0, 1] * (N // 2))
    null = torch.full_like(labels, 2)
    den = comp.sampler(N, guidance_scale=scale, scheduler=sched)
    tv_c, tv_null, rel, base = [], [], [], []
    prior_c = class_priors[:, labels].T / class_priors[:, labels].T.sum(1, keepdim=True)  # P(i | c), no x
    for t in sched.timesteps:
        out = den.compose(x, t.expand(N), labels)
        w_c = exact_posterior(comps, PRIORS, [0, 1, 2], x, t, labels)
        tv_c.append(0.5 * (out.weights - w_c).abs().sum(1))
        base.append(0.5 * (prior_c - w_c).abs().sum(1))
        eps_c = mixture_eps(comps, PRIORS, [0, 1, 2], x, t, labels)
        if scale == 1.0:
            assert out.null_weights is None
            want = eps_c
        else:
            assert out.null_weights is not None
            w_null = exact_posterior(comps, PRIORS, [0, 1, 2], x, t, null)
            tv_null.append(0.5 * (out.null_weights - w_null).abs().sum(1))
            eps_null = mixture_eps(comps, PRIORS, [0, 1, 2], x, t, null)
            want = eps_null + scale * (eps_c - eps_null)
        rel.append((out.eps - want).flatten(1).norm(dim=1) / want.flatten(1).norm(dim=1))
        x = sched.step(out.eps, t, x, generator=gen).prev_sample
    tvc, r = torch.stack(tv_c), torch.stack(rel)
    print(f"scale {scale}: cond tv max / mean {float(tvc.max()):.4f} / {float(tvc.mean()):.5f}")
    print(f"  eps rel max / mean {float(r.max()):.4f} / {float(r.mean()):.5f}")
    print(f"  no-router baseline (w = P(i | c)) tv mean {float(torch.stack(base).mean()):.3f}")
    # both branches in one call per compartment and step: N rows unguided, 2N guided
    assert all(c.calls == steps and c.rows == steps * N * (1 if scale == 1.0 else 2) for c in comps)
    # measured at 100 DDPM steps: tv max 0.10 / mean 0.0032-0.0040 (conditional), 0.13 / 0.0065 (null branch);
    # eps relative error max 0.10 (s = 1) and 0.20 (s = 3, which amplifies the branch difference), mean <= 0.004
    assert float(tvc.max()) < 0.2 and float(tvc.mean()) < 0.008
    assert float(tvc.mean()) < float(torch.stack(base).mean()) / 10
    assert float(r.mean()) < 0.008 and float(r.max()) < 0.4
    if tv_null:
        tvn = torch.stack(tv_null)
        print(f"  null tv max / mean {float(tvn.max()):.4f} / {float(tvn.mean()):.5f}")
        assert float(tvn.max()) < 0.26 and float(tvn.mean()) < 0.013


def test_guidance_scale_one_is_the_unguided_trajectory_exactly():
    comps, class_priors = labelled_mixture()
    comp = DensityComposition(comps, NAMES, ABAR, priors=PRIORS, class_priors=class_priors)
    labels = torch.tensor([0, 1] * (N // 2))
    runs = []
    for den in (comp.sampler(N, guidance_scale=1.0, scheduler=ddpm()), comp.trajectory(N)):
        sched = ddpm()
        sched.set_timesteps(20)
        gen = torch.Generator().manual_seed(9)
        x = torch.randn((N, *SHAPE), generator=gen, dtype=torch.float64)
        for t in sched.timesteps:
            x = sched.step(den(x, t, labels), t, x, generator=gen).prev_sample
        runs.append(x)
    assert torch.equal(runs[0], runs[1])


def test_the_estimator_is_picked_from_the_scheduler_and_bad_combinations_refused(comps):
    from diffusers import EulerDiscreteScheduler

    from cdm.routing import estimator_for

    sde = DPMSolverMultistepScheduler(**SCHEDULE, algorithm_type="sde-dpmsolver++")
    dpm = DPMSolverMultistepScheduler(**SCHEDULE, algorithm_type="dpmsolver++")
    assert [estimator_for(s) for s in (ddpm(), sde, ddim(), dpm)] == ["ito", "ito", "divergence", "divergence"]
    assert estimator_for(ddpm(), "divergence") == "divergence"  # the divergence estimator works on any path
    with pytest.raises(ConfigError, match="needs a stochastic sampler"):
        estimator_for(ddim(), "ito")
    with pytest.raises(ConfigError, match="EulerDiscreteScheduler"):
        estimator_for(EulerDiscreteScheduler(**SCHEDULE))
    auto = composition(comps, estimator="auto")
    assert auto.trajectory(N, scheduler=dpm).estimator == "divergence"
    assert auto.trajectory(N, scheduler=ddpm()).estimator == "ito"
    with pytest.raises(ConfigError, match="pass the scheduler"):
        auto.trajectory(N)
    with pytest.raises(ConfigError, match="stochastic sampler"):
        composition(comps, estimator="ito").trajectory(N, scheduler=dpm)
    with pytest.raises(ConfigError, match="top_k"):
        auto.sampler(N, top_k=1, scheduler=ddpm())
    with pytest.raises(ConfigError, match="prior 0 for every source"):
        DensityComposition(comps, NAMES, ABAR, priors=[1.0, 0.0, 1.0]).trajectory(N, allowed=["b"])
