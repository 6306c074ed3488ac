"""Image attribution (cdm/image_attribution.py): the density kind's ELBO posterior against the exact posterior of
analytic Gaussian-mixture sources, access rights (only the allowed compartments ever run), and the one entry point
over real tiny compartments of both routing kinds.

Analytic sources (tests/cdm/gaussians.py): source i is the mixture sum_c pi_{i,c} N(mu_{i,c}, s_i^2 I) in 16 dims
under the cosine schedule, and its compartment returns the EXACT eps of its noised marginal (of class c's Gaussian
for label c). The exact answer is P(i | x_0) = lambda_i q_i(x_0) / sum_k lambda_k q_k(x_0) (with a label y:
lambda_i pi_{i,y} N(x_0; mu_{i,y}, s_i^2 I), normalised).

Tolerances. With exact eps the estimator's error has two parts: the discrete bound itself (T = 1000 DDPM steps:
its gap to log q_i(x_0), small where the steps are small in log-SNR, and the truncation at t = 0) and the Monte
Carlo noise of the draws. Measured at these seeds over 48 points, every timestep, 16 paired draws: total variation
max / mean 0.013 / 0.0008 unconditional, 0.004 / 0.0004 labelled, and |log P - log P*| at most 0.14 nats wherever
P* > 1e-3; with 64 draws the unconditional TV max only falls to 0.009 (log error 0.10), so what is left is mostly
the discrete bound's. Asserted: TV max < 0.03, mean < 0.003, log error < 0.3 nats (about 2x). The no-router baseline
(the priors) is at TV 0.59 on average, so none is met trivially. Every 10th timestep with 8 draws (the subset tests)
is a coarser quadrature: TV max up to 0.12 and mean up to 0.005 measured, asserted < 0.25 and < 0.02.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from cdm.compartment import Compartment
from cdm.errors import ConfigError, DataError
from cdm.image_attribution import attribute_images, attribute_tensors, elbo_weights
from cdm.routing import DensityComposition, Router, build_composition
from tests.cdm.gaussians import ABAR, SHAPE, GaussianSource, log_normal
from tests.cdm.test_routing import COUNTS, tiny_compartments, tiny_router

NAMES = ["a", "b", "c"]
PRIORS = [0.5, 0.3, 0.2]
N = 48
ALL_T = list(range(len(ABAR)))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Counted(GaussianSource):
    """A GaussianSource that counts its calls, rows and the labels it saw, and keeps no copy of the rows."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.labels: Counter[int] = Counter()

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        self.calls += 1
        self.rows += x_t.shape[0]
        if class_labels is not None:
            self.labels.update(int(c) for c in class_labels)
        return self.exact(x_t, t, class_labels)

    def reset(self) -> None:
        super().reset()
        self.labels = Counter()


def mixture_sources() -> list[Counted]:
    """Three two-component mixtures, scales 0.3, 0.6, 1.0, means ~N(0, 0.3^2) (close: posteriors not one-hot)."""
    g = torch.Generator().manual_seed(0)
    comps = []
    for s, pis in zip((0.3, 0.6, 1.0), ([0.7, 0.3], [0.4, 0.6], [0.5, 0.5]), strict=True):
        mus = torch.randn((2, *SHAPE), generator=g, dtype=torch.float64) * 0.3
        comps.append(Counted(mus, s, pis))
    return comps


def draw_points(comps: list[Counted], n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """n clean points: a source by PRIORS, a component by its pis, then the Gaussian; returns (x_0, components)."""
    g = torch.Generator().manual_seed(seed)
    src = torch.multinomial(torch.tensor(PRIORS), n, replacement=True, generator=g)
    xs, cs = [], []
    for i in src.tolist():
        c = int(torch.multinomial(comps[i].log_pis.exp(), 1, generator=g))
        xs.append(comps[i].mus[c] + comps[i].s * torch.randn(SHAPE, generator=g, dtype=torch.float64))
        cs.append(c)
    return torch.stack(xs), torch.tensor(cs)


def exact_posterior(comps, subset, x0: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """(N, |S|) P(i | x_0[, y]) over ``subset`` (indices): lambda_i q_i(x_0) (or lambda_i pi_{i,y} N(mu_{i,y}))."""
    n = x0.shape[0]
    cols = []
    for i in subset:
        c = comps[i]
        var = torch.full((n,), c.s**2, dtype=torch.float64)
        per_class = torch.stack([lp + log_normal(x0, mu, var) for lp, mu in zip(c.log_pis, c.mus, strict=True)], 1)
        joint = torch.logsumexp(per_class, 1) if labels is None else per_class.gather(1, labels[:, None])[:, 0]
        cols.append(math.log(PRIORS[i]) + joint)
    return torch.softmax(torch.stack(cols, 1), 1)


def tv(p: np.ndarray | torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return 0.5 * (torch.tensor(np.array(p), dtype=torch.float64) - q).abs().sum(1)


def density(comps, *, class_priors: torch.Tensor | None = None, subset=None) -> DensityComposition:
    return DensityComposition(comps, NAMES, ABAR, priors=PRIORS, class_priors=class_priors, subset=subset)


# ------------------------------------------------------------------------------------------------ the weights


def test_elbo_weights_are_the_ddpm_bound_on_a_quadrature_that_covers_every_timestep():
    abar = ABAR
    alpha = abar / torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    lam = (1 - alpha) / (2 * alpha * (1 - abar))
    torch.testing.assert_close(elbo_weights(abar, ALL_T), lam, rtol=1e-12, atol=0)
    assert math.isclose(float(lam[0]), 1 / (2 * float(alpha[0])))  # t = 0: the Gaussian decoder's term
    # four nodes: cells [0, 101), [101, 226), [226, 401), [401, 1000) (midpoints, ties to the lower node)
    w = elbo_weights(abar, [150, 50, 500, 300])  # in the caller's order
    widths = w / lam[[150, 50, 500, 300]]
    torch.testing.assert_close(widths, torch.tensor([125.0, 101, 599, 175], dtype=torch.float64))
    assert float(widths.sum()) == len(abar)
    # copies of a timestep share its cell; a single node covers everything
    torch.testing.assert_close(elbo_weights(abar, [10, 10]), torch.full((2,), 500.0, dtype=torch.float64) * lam[10])
    torch.testing.assert_close(elbo_weights(abar, [7]), 1000 * lam[[7]])
    with pytest.raises(ConfigError, match="must be non-empty"):
        elbo_weights(abar, [1000])


# ------------------------------------------------------------------------------------------- analytic sources


@pytest.mark.parametrize("labelled", [False, True], ids=["unconditional", "labelled"])
def test_the_elbo_posterior_matches_the_exact_posterior_of_gaussian_mixture_sources(labelled):
    comps = mixture_sources()
    x0, components = draw_points(comps, N)
    labels = components if labelled else None
    # P(i | y) = lambda_i pi_{i,y} / sum_k ... : the density kind's class priors (from class counts)
    class_priors = torch.tensor(PRIORS, dtype=torch.float64)[:, None] * torch.stack([c.log_pis.exp() for c in comps])
    comp = density(comps, class_priors=class_priors)
    res = attribute_tensors(comp, x0, timesteps=ALL_T, draws=16, class_labels=labels, seed=3)
    exact = exact_posterior(comps, [0, 1, 2], x0, labels)
    err = tv(res.posterior, exact)
    baseline = tv(np.broadcast_to(np.array(PRIORS), (N, 3)), exact)
    assert res.method == "elbo" and res.sources == NAMES and res.posterior.shape == (N, 3)
    assert res.by_timestep.shape == (len(ALL_T), N, 3) and res.timesteps == tuple(ALL_T) and res.draws == 16
    assert float(err.max()) < 0.03 and float(err.mean()) < 0.003, (float(err.max()), float(err.mean()))
    assert float(baseline.mean()) > 0.3, "the exact posterior is far from the priors: the bounds say something"
    # the tails too: log P to 0.3 nats wherever the exact P > 1e-3; and there are uncertain points among them
    seen = exact > 1e-3
    log_err = (torch.tensor(np.array(res.posterior)).log() - exact.log()).abs()[seen]
    assert float(log_err.max()) < 0.3, float(log_err.max())
    assert int(((exact > 0.02) & (exact < 0.98)).any(1).sum()) >= 5
    # every compartment ran once per timestep on draws x N rows (the same (t, eps) draws for all: one batch each)
    assert [c.calls for c in comps] == [len(ALL_T)] * 3 and [c.rows for c in comps] == [len(ALL_T) * 16 * N] * 3


def test_by_timestep_holds_each_terms_own_posterior_and_the_terms_add_up_to_the_posterior():
    comps = mixture_sources()
    x0, _ = draw_points(comps, 8)
    ts = [5, 60, 200, 420, 990]
    comp = density(comps)
    res = attribute_tensors(comp, x0, timesteps=ts, draws=4, seed=0)
    log_prior = (comp.priors / comp.priors.sum()).log().numpy()
    # log by_t = log prior + term_t - log Z_t, so log prior + sum_t (log by_t - log prior) is the posterior's logits
    logits = log_prior + (np.log(res.by_timestep) - log_prior).sum(0)
    expected = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(res.posterior, expected / expected.sum(1, keepdims=True), rtol=1e-9, atol=1e-12)
    # the high-noise term says little (close to the priors), the low-noise ones most
    spread = [float(tv(res.by_timestep[k], torch.tensor(PRIORS, dtype=torch.float64)).mean()) for k in range(5)]
    assert spread[-1] < 0.005 and min(spread[1:4]) > 0.3, spread
    # same seed: the same answer; another seed: another Monte Carlo estimate
    again = attribute_tensors(density(comps), x0, timesteps=ts, draws=4, seed=0)
    np.testing.assert_array_equal(again.posterior, res.posterior)
    assert not np.array_equal(
        attribute_tensors(density(comps), x0, timesteps=ts, draws=4, seed=1).posterior, again.posterior
    )


SUBSETS = [s for r in (1, 2, 3) for s in itertools.combinations(range(3), r)]


@pytest.mark.parametrize("subset", SUBSETS, ids=lambda s: "".join(NAMES[i] for i in s))
def test_every_subset_is_its_own_sub_mixture_and_no_compartment_outside_it_runs(subset):
    comps = mixture_sources()
    x0, _ = draw_points(comps, N, seed=2)
    ts = ALL_T[::10]
    names = [NAMES[i] for i in subset]
    res = attribute_tensors(density(comps), x0, sources=names, timesteps=ts, draws=8, seed=4)
    assert res.sources == names and res.posterior.shape == (N, len(subset))
    np.testing.assert_allclose(res.posterior.sum(1), 1.0, rtol=1e-12)
    err = tv(res.posterior, exact_posterior(comps, subset, x0))
    assert float(err.max()) < 0.25 and float(err.mean()) < 0.02, (float(err.max()), float(err.mean()))
    for i, c in enumerate(comps):
        assert (c.calls, c.rows) == ((len(ts), len(ts) * 8 * N) if i in subset else (0, 0)), NAMES[i]
    # the same draws whatever the subset: the posterior over S is the full one restricted to S and renormalised
    for c in comps:
        c.reset()
    full = attribute_tensors(density(comps), x0, timesteps=ts, draws=8, seed=4).posterior[:, list(subset)]
    np.testing.assert_allclose(res.posterior, full / full.sum(1, keepdims=True), rtol=1e-9, atol=1e-12)


def test_the_compositions_own_subset_bounds_the_callers_sources():
    comps = mixture_sources()
    x0, _ = draw_points(comps, 4)
    comp = density(comps, subset=["a", "c"])
    res = attribute_tensors(comp, x0, timesteps=[10, 300], draws=2)
    assert res.sources == ["a", "c"] and comps[1].calls == 0
    with pytest.raises(ConfigError, match="outside this composition's subset"):
        attribute_tensors(comp, x0, sources=["b"], timesteps=[10], draws=1)
    assert comps[1].calls == 0


def test_a_zero_class_prior_means_that_compartment_never_sees_the_image():
    comps = mixture_sources()
    x0, _ = draw_points(comps, 4)
    class_priors = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)  # b never 1, c never 0
    labels = torch.tensor([0, 1, 0, 1])
    res = attribute_tensors(
        density(comps, class_priors=class_priors), x0, timesteps=[3, 30], draws=3, class_labels=labels
    )
    assert (res.posterior[[0, 2], 2] == 0).all() and (res.posterior[[1, 3], 1] == 0).all()
    assert (res.by_timestep[:, [0, 2], 2] == 0).all() and (res.posterior > 0).sum() == 8
    assert comps[1].labels == Counter({0: 2 * 3 * 2}) and comps[2].labels == Counter({1: 2 * 3 * 2})
    assert comps[0].labels == Counter({0: 2 * 3 * 2, 1: 2 * 3 * 2})
    with pytest.raises(
        ConfigError, match=r"image 0: none of the sources \['c'\] has a positive prior for its class label 0"
    ):
        attribute_tensors(
            density(comps, class_priors=class_priors), x0[:1], sources=["c"], timesteps=[3], class_labels=[0]
        )
    zero = DensityComposition(comps, NAMES, ABAR, priors=[1.0, 0.0, 1.0])
    before = [c.calls for c in comps]
    with pytest.raises(ConfigError, match=r"every source in \['b'\] has prior 0"):
        attribute_tensors(zero, x0, sources=["b"], timesteps=[3])
    assert [c.calls for c in comps] == before, "nothing runs on a refused request"


# ------------------------------------------------------------------------------------ real tiny compartments


@pytest.fixture(scope="module")
def tiny() -> tuple[list[Compartment], Router]:
    """Untrained (seeded, deterministic) 8x8 compartments with untrained heads, class counts COUNTS, and an untrained
    router (tests/cdm/test_routing.py's)."""
    return tiny_compartments(), tiny_router()


def compose(kind: str, tiny) -> Any:
    comps, router = tiny
    return build_composition(
        kind,
        comps,
        NAMES,
        router=router if kind == "learnt" else None,
        n_samples=[sum(c) for c in COUNTS],
        class_counts=COUNTS,
    )


def count_rows(comps: list[Compartment]) -> tuple[Counter[str], Callable[[], None]]:
    """Rows each compartment's forward saw (forward pre-hooks), and a function removing the hooks."""
    rows: Counter[str] = Counter()
    handles = []
    for name, module in zip(NAMES, comps, strict=True):

        def hook(_module: Any, args: tuple[Any, ...], name: str = name) -> None:
            rows.update({name: int(args[0].shape[0])})

        handles.append(module.register_forward_pre_hook(hook))
    return rows, lambda: [h.remove() for h in handles]


def images(n: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 8, 8), dtype=np.uint8)


def test_density_attribution_of_images_through_real_compartments(tiny):
    comp = compose("density", tiny)
    rows, unhook = count_rows(tiny[0])
    try:
        res = attribute_images(comp, images(3), timesteps=(20, 400), draws=3, seed=5)
        assert res.method == "elbo" and res.sources == NAMES and res.timesteps == (20, 400) and res.draws == 3
        assert res.posterior.shape == (3, 3) and res.by_timestep.shape == (2, 3, 3)
        np.testing.assert_allclose(res.posterior.sum(1), 1, rtol=1e-12)
        np.testing.assert_allclose(res.by_timestep.sum(2), 1, rtol=1e-12)
        assert rows == Counter({n: 2 * 3 * 3 for n in NAMES})
        # RGB and any size: converted to the model's grey 8x8; the same image, the same answer
        grey = images(1)
        rgb = np.repeat(grey[..., None], 3, axis=-1)
        np.testing.assert_allclose(
            attribute_images(comp, rgb, timesteps=(20,), draws=2).posterior,
            attribute_images(comp, grey, timesteps=(20,), draws=2).posterior,
            rtol=1e-6,
        )
        # a subset: renormalised over it, computed from its compartments only
        rows.clear()
        sub = attribute_images(comp, images(3), sources=["c", "a"], timesteps=(20, 400), draws=3, seed=5)
        assert sub.sources == ["a", "c"] and rows == Counter({"a": 18, "c": 18})
        full = res.posterior[:, [0, 2]]
        np.testing.assert_allclose(sub.posterior, full / full.sum(1, keepdims=True), rtol=1e-6)
        # class labels: P(i | c) from the class counts; label 0 is only a's, label 5 only c's; b never runs
        rows.clear()
        lab = attribute_images(comp, images(2), class_labels=[0, 5], timesteps=(20, 400), draws=3)
        np.testing.assert_array_equal(lab.posterior, [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
        assert rows == Counter({"a": 6, "c": 6})
        rows.clear()
        one = attribute_images(comp, images(2), class_labels=[3], timesteps=(20,), draws=2)  # one label for all
        np.testing.assert_array_equal(one.posterior, [[0.0, 1.0, 0.0]] * 2)  # class 3 is only b's
        assert rows == Counter({"b": 2 * 2})
    finally:
        unhook()


@pytest.mark.parametrize("kind", ["learnt", "heads"])
def test_the_router_kinds_are_unchanged_the_routers_posterior_without_any_compartment(tiny, kind):
    comp = compose(kind, tiny)
    rows, unhook = count_rows(tiny[0])
    try:
        res = attribute_images(comp, images(2), sources=["a", "c"], timesteps=(10, 200), draws=2, seed=1)
    finally:
        unhook()
    assert res.method == "router" and res.sources == ["a", "c"] and res.posterior.shape == (2, 2)
    np.testing.assert_allclose(res.posterior, res.by_timestep.mean(0))
    np.testing.assert_allclose(res.posterior.sum(1), 1, rtol=1e-5)
    assert sum(rows.values()) == 0, "the learnt and heads kinds read the router only"


@pytest.mark.parametrize(
    ("kwargs", "error", "needle"),
    [
        ({"images": np.zeros((1, 8, 8), np.float32)}, DataError, "must be uint8"),
        ({"images": np.zeros((1, 2, 8, 8, 1), np.uint8)}, DataError, "must be (N,H,W) or (N,H,W,C)"),
        ({"images": np.zeros((1, 8, 8, 2), np.uint8)}, DataError, "have 2 channels"),
        ({"images": np.zeros((0, 8, 8), np.uint8)}, DataError, "no image to attribute"),
        ({"draws": 0}, ConfigError, "draws = 0 must be >= 1"),
        ({"timesteps": ()}, ConfigError, "must be non-empty"),
        ({"timesteps": (10, 1000)}, ConfigError, "in [0, 1000)"),
        ({"sources": ["a", "zzz"]}, ConfigError, "unknown source(s) ['zzz']"),
        ({"sources": "a"}, ConfigError, "got the string 'a'"),
        ({"sources": []}, ConfigError, "the access subset is empty"),
        ({"class_labels": [10]}, ConfigError, "class label 10 is out of range"),
        ({"class_labels": [1, 2]}, ConfigError, "2 class labels for 1 images"),
    ],
)
@pytest.mark.parametrize("kind", ["learnt", "density", "heads"])
def test_bad_input_is_refused_with_what_to_do(tiny, kind, kwargs, error, needle):
    comp = compose(kind, tiny)
    rows, unhook = count_rows(tiny[0])
    args: dict[str, Any] = {"images": images(1), "timesteps": (10,), "draws": 1, **kwargs}
    try:
        with pytest.raises(error) as info:
            attribute_images(comp, args.pop("images"), **args)
    finally:
        unhook()
    assert needle in str(info.value)
    assert sum(rows.values()) == 0, "nothing runs on a bad request"


def test_labels_for_unconditional_compartments_and_unknown_kinds_are_refused():
    comps = [GaussianSource(torch.zeros((1, *SHAPE), dtype=torch.float64), 1.0) for _ in NAMES]  # no classes
    x0 = torch.zeros((1, *SHAPE), dtype=torch.float64)
    with pytest.raises(ConfigError, match="unconditional"):
        attribute_tensors(density(comps), x0, timesteps=[1], class_labels=[0])
    with pytest.raises(DataError, match="model space"):
        attribute_tensors(density(comps), torch.zeros((1, 2, 4, 4)), timesteps=[1])
    with pytest.raises(ConfigError, match="learnt, heads\\) and the density kind \\(ELBO\\)"):
        attribute_tensors(torch.nn.Identity(), x0, timesteps=[1])  # type: ignore[arg-type]
