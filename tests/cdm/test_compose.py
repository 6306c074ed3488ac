"""Composition is exact (learnt kind): analytic Gaussian-mixture compartments and an exact-posterior router give the
mixture's eps, for the full set, every subset, per-row allowed masks, top-k and classifier-free guidance."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from cdm.compose import (
    ComposedDenoiser,
    allowed_mask,
    check_top_k,
    restricted_softmax,
    top_k_weights,
)
from cdm.errors import ConfigError
from tests.cdm.gaussians import (
    SHAPE,
    ExactRouter,
    exact_posterior,
    make_sources,
    mixture_eps,
)

NAMES = ["a", "b", "c"]
PRIORS = [0.5, 0.3, 0.2]
SUBSETS = [list(s) for r in (1, 2, 3) for s in itertools.combinations(range(3), r)]
N = 64


@pytest.fixture()
def mixture():
    comps = make_sources()
    router = ExactRouter(comps, PRIORS, NAMES)
    g = torch.Generator().manual_seed(0)
    x = torch.randn((N, *SHAPE), generator=g, dtype=torch.float64)
    t = torch.randint(0, 1000, (N,), generator=g)
    return comps, router, x, t


def seen_rows(comp) -> torch.Tensor:
    return torch.cat(comp.seen) if comp.seen else torch.zeros((0, *SHAPE), dtype=torch.float64)


def test_full_composition_equals_true_mixture_eps(mixture):
    comps, router, x, t = mixture
    den = ComposedDenoiser(comps, router, NAMES, vectorize="loop")
    out = den.compose(x, t, None)
    torch.testing.assert_close(out.eps, mixture_eps(comps, PRIORS, [0, 1, 2], x, t), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out.weights, exact_posterior(comps, PRIORS, [0, 1, 2], x, t), rtol=1e-9, atol=1e-12)
    assert out.null_weights is None
    assert torch.equal(den(x, t, None), out.eps), "__call__ is the plain denoiser: eps only, the same eps"


@pytest.mark.parametrize("subset", SUBSETS, ids=lambda s: "".join(NAMES[i] for i in s))
def test_every_subset_equals_its_sub_mixture_and_never_calls_outside(mixture, subset):
    comps, router, x, t = mixture
    names = [NAMES[i] for i in subset]
    # the same subset as a per-call allowed set and as the composition's own (access rights fixed at construction)
    for den, allowed in (
        (ComposedDenoiser(comps, router, NAMES, vectorize="loop"), names),
        (ComposedDenoiser(comps, router, NAMES, subset=names, vectorize="loop"), None),
    ):
        for c in comps:
            c.reset()
        out = den.compose(x, t, None, allowed=allowed)
        # the sub-mixture over S with priors renormalised over S
        torch.testing.assert_close(out.eps, mixture_eps(comps, PRIORS, subset, x, t), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(out.weights, exact_posterior(comps, PRIORS, subset, x, t), rtol=1e-9, atol=1e-12)
        for i, c in enumerate(comps):
            if i in subset:
                assert c.calls == 1 and c.rows == N, "one call per compartment, on every row"
            else:
                assert c.calls == 0, f"compartment {NAMES[i]} outside the allowed set was evaluated"
                assert torch.all(out.weights[:, i] == 0)
        torch.testing.assert_close(out.weights.sum(1), torch.ones(N, dtype=torch.float64))


def test_per_row_masks_equal_separate_calls_and_rows_reach_only_their_compartments(mixture):
    comps, router, x, t = mixture
    den = ComposedDenoiser(comps, router, NAMES, vectorize="loop")
    # row n may use SUBSETS[n % 7]: seven different allowed sets in one batch
    row_sets = [SUBSETS[n % len(SUBSETS)] for n in range(N)]
    mask = torch.zeros((N, 3), dtype=torch.bool)
    for n, s in enumerate(row_sets):
        mask[n, s] = True
    out = den.compose(x, t, None, allowed=mask)
    for i, c in enumerate(comps):
        rows = mask[:, i].nonzero(as_tuple=True)[0]
        assert c.calls == 1, "each compartment runs once per call, on all of its rows together"
        assert torch.equal(seen_rows(c), x[rows]), f"compartment {NAMES[i]} saw rows outside its allowed set"
        assert torch.all(out.weights[~mask[:, i], i] == 0)
    for subset in SUBSETS:
        rows = torch.tensor([n for n in range(N) if row_sets[n] == subset])
        alone = den.compose(x[rows], t[rows], None, allowed=[NAMES[i] for i in subset])
        torch.testing.assert_close(out.eps[rows], alone.eps, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(out.weights[rows], alone.weights, rtol=1e-12, atol=1e-14)
        want = mixture_eps(comps, PRIORS, subset, x[rows], t[rows])
        torch.testing.assert_close(out.eps[rows], want, rtol=1e-9, atol=1e-9)


def test_weights_approach_priors_at_high_noise(mixture):
    comps, router, x, _ = mixture
    w = ComposedDenoiser(comps, router, NAMES).weights(x, torch.full((N,), 999), None)
    # at t = T the marginals of all sources are ~N(0, I): the posterior is the prior
    torch.testing.assert_close(w.mean(0), torch.tensor(PRIORS, dtype=w.dtype), atol=0.02, rtol=0)


def test_top_k_with_k_at_least_the_allowed_count_is_the_full_mixture(mixture):
    comps, router, x, t = mixture
    full = ComposedDenoiser(comps, router, NAMES).compose(x, t, None)
    topk = ComposedDenoiser(comps, router, NAMES, mode="top_k", top_k=3).compose(x, t, None)
    assert torch.equal(full.eps, topk.eps) and torch.equal(full.weights, topk.weights)
    sub = ComposedDenoiser(comps, router, NAMES, mode="top_k", top_k=2).compose(x, t, None, allowed=["a", "c"])
    torch.testing.assert_close(sub.eps, mixture_eps(comps, PRIORS, [0, 2], x, t), rtol=1e-9, atol=1e-9)


def test_top_1_routes_each_sample_to_exactly_one_compartment(mixture):
    comps, router, x, t = mixture
    # k = 1 < K = 3: the top-k branch itself (this is what k = K never exercised)
    out = ComposedDenoiser(comps, router, NAMES, mode="top_k", top_k=1).compose(x, t, None)
    w = out.weights
    assert torch.all((w > 0).sum(1) == 1) and torch.all(w.sum(1) == 1)
    torch.testing.assert_close(w.argmax(1), exact_posterior(comps, PRIORS, [0, 1, 2], x, t).argmax(1))
    assert all(c.calls <= 1 for c in comps) and sum(c.rows for c in comps) == N
    chosen = w.argmax(1)
    for i, c in enumerate(comps):
        rows = (chosen == i).nonzero(as_tuple=True)[0]
        assert torch.equal(seen_rows(c), x[rows]), "each compartment ran on exactly the rows that chose it"
        if len(rows):
            torch.testing.assert_close(out.eps[rows], c.exact(x[rows], t[rows]))


def test_top_2_of_3_evaluates_only_each_rows_two_highest_weights_and_renormalises(mixture):
    comps, router, x, t = mixture
    # k = 2 < K = 3: each row keeps its two largest posterior weights, rescaled to sum to 1
    posterior = exact_posterior(comps, PRIORS, [0, 1, 2], x, t)
    keep = torch.zeros_like(posterior, dtype=torch.bool)
    keep.scatter_(1, posterior.topk(2, dim=1).indices, True)
    assert not torch.all(keep[:, 0]), "the batch must drop each compartment on some row for this test to bite"
    want_w = torch.where(keep, posterior, 0.0)
    want_w = want_w / want_w.sum(1, keepdim=True)
    out = ComposedDenoiser(comps, router, NAMES, mode="top_k", top_k=2, vectorize="loop").compose(x, t, None)
    torch.testing.assert_close(out.weights, want_w, rtol=1e-9, atol=1e-12)
    assert torch.equal(out.weights > 0, keep)
    torch.testing.assert_close(out.weights.sum(1), torch.ones(N, dtype=torch.float64))
    for i, c in enumerate(comps):
        rows = keep[:, i].nonzero(as_tuple=True)[0]
        assert c.calls == 1 and torch.equal(seen_rows(c), x[rows]), f"{NAMES[i]} ran on rows outside its top 2"
    # eps is the renormalised mixture of the two kept compartments' exact eps
    want_eps = sum(want_w[:, i].view(-1, *([1] * len(SHAPE))) * c.exact(x, t) for i, c in enumerate(comps))
    torch.testing.assert_close(out.eps, want_eps, rtol=1e-9, atol=1e-9)


def test_per_row_top_k_and_masks(mixture):
    comps, router, x, t = mixture
    den = ComposedDenoiser(comps, router, NAMES, vectorize="loop")
    k = torch.tensor([1, 2, 3, 1] * (N // 4))
    mask = torch.ones((N, 3), dtype=torch.bool)
    mask[::2, 1] = False  # even rows may not use b
    out = den.compose(x, t, None, allowed=mask, top_k=k)
    allowed_count = mask.sum(1)
    assert torch.equal((out.weights > 0).sum(1), torch.minimum(k, allowed_count))
    assert torch.all(out.weights[::2, 1] == 0)
    # rows whose k covers their allowed set are the exact sub-mixture
    full_rows = (k >= allowed_count).nonzero(as_tuple=True)[0]
    for n in full_rows.tolist():
        subset = mask[n].nonzero(as_tuple=True)[0].tolist()
        want = mixture_eps(comps, PRIORS, subset, x[n : n + 1], t[n : n + 1])
        torch.testing.assert_close(out.eps[n : n + 1], want, rtol=1e-9, atol=1e-9)
    # the same as one call per row group
    for kk in (1, 2, 3):
        rows = (k == kk).nonzero(as_tuple=True)[0]
        alone = den.compose(x[rows], t[rows], None, allowed=mask[rows], top_k=kk)
        torch.testing.assert_close(out.eps[rows], alone.eps, rtol=1e-12, atol=1e-14)
    # and each compartment ran once, on exactly the rows whose weight on it is positive
    for c in comps:
        c.reset()
    out = den.compose(x, t, None, allowed=mask, top_k=k)
    for i, c in enumerate(comps):
        assert c.calls == 1
        assert torch.equal(seen_rows(c), x[(out.weights[:, i] > 0).nonzero(as_tuple=True)[0]])


def test_weight_helpers():
    logits = torch.tensor([[0.0, 1.0, 2.0], [3.0, 0.0, 1.0]])
    mask = torch.tensor([[True, False, True], [False, True, True]])
    w = restricted_softmax(logits, mask)
    assert w[0, 1] == 0 and w[1, 0] == 0
    torch.testing.assert_close(w.sum(1), torch.ones(2))
    p = torch.softmax(logits, 1)
    assert math.isclose(float(w[0, 0]), float(p[0, 0] / (p[0, 0] + p[0, 2])), rel_tol=1e-6)
    t = top_k_weights(torch.tensor([[0.2, 0.5, 0.3]]), 2)
    torch.testing.assert_close(t, torch.tensor([[0.0, 0.625, 0.375]]))
    per_row = top_k_weights(torch.tensor([[0.2, 0.5, 0.3], [0.2, 0.5, 0.3]]), torch.tensor([1, 3]))
    torch.testing.assert_close(per_row, torch.tensor([[0.0, 1.0, 0.0], [0.2, 0.5, 0.3]]))
    ties = top_k_weights(torch.tensor([[0.25, 0.25, 0.5]]), 2)
    torch.testing.assert_close(ties, torch.tensor([[1 / 3, 0.0, 2 / 3]]))  # a tie goes to the lower column
    assert torch.equal(allowed_mask(NAMES, ["c", "a"], 2), torch.tensor([[True, False, True]] * 2))
    assert torch.equal(allowed_mask(NAMES, None, 1), torch.ones((1, 3), dtype=torch.bool))


@pytest.mark.parametrize(
    ("top_k", "match"),
    [
        (0, "top_k must be >= 1, got 0"),
        (-1, "top_k must be >= 1"),
        (True, "integer"),
        (1.5, "integer"),
        ("2", "integer"),
        (torch.tensor([1, 0, 1, 1]), "every row"),
        (torch.tensor([1, 1]), "shape"),
        (torch.tensor([1.0, 1.0, 1.0, 1.0]), "integer tensor"),
    ],
)
def test_top_k_validation(mixture, top_k, match):
    comps, router, x, t = mixture
    with pytest.raises(ConfigError, match=match):
        check_top_k(top_k, 4)
    with pytest.raises(ConfigError, match=match):
        ComposedDenoiser(comps, router, NAMES).compose(x[:4], t[:4], None, top_k=top_k)
    if isinstance(top_k, int) and not isinstance(top_k, bool):
        with pytest.raises(ConfigError, match=match):
            ComposedDenoiser(comps, router, NAMES, mode="top_k", top_k=top_k)
    assert check_top_k(None, 4) is None and check_top_k(2, 4) == 2


def test_bad_options_are_rejected(mixture):
    comps, router, x, t = mixture
    with pytest.raises(ConfigError, match="unknown source"):
        ComposedDenoiser(comps, router, NAMES, subset=["zzz"])
    with pytest.raises(ConfigError, match="empty"):
        ComposedDenoiser(comps, router, NAMES, subset=[])
    with pytest.raises(ConfigError, match="string"):
        ComposedDenoiser(comps, router, NAMES, subset="a")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="router was not trained"):
        ComposedDenoiser(comps, router, ["a", "b", "x"])
    with pytest.raises(ConfigError, match="unique"):
        ComposedDenoiser(comps, router, ["a", "a", "b"], router_names=NAMES)
    den = ComposedDenoiser(comps, router, NAMES)
    with pytest.raises(ConfigError, match="row 1 of the allowed mask allows no source"):
        den.compose(x[:2], t[:2], None, allowed=torch.tensor([[True, False, False], [False, False, False]]))
    with pytest.raises(ConfigError, match=r"shape \(2, 3\)"):
        den.compose(x[:2], t[:2], None, allowed=torch.ones((2, 2), dtype=torch.bool))
    # a per-call allowed set never widens the composition's own subset
    narrow = ComposedDenoiser(comps, router, NAMES, subset=["a"])
    with pytest.raises(ConfigError, match="outside this composition's subset"):
        narrow.compose(x[:2], t[:2], None, allowed=["b"])
    w = narrow.compose(x[:2], t[:2], None, allowed=["a", "b"]).weights
    assert torch.all(w[:, 0] == 1) and torch.all(w[:, 1:] == 0)


# ----------------------------------------------------------------------------------------------------- guidance


@pytest.fixture()
def labelled():
    comps = make_sources(classes=2)
    router = ExactRouter(comps, PRIORS, NAMES)
    g = torch.Generator().manual_seed(5)
    x = torch.randn((N, *SHAPE), generator=g, dtype=torch.float64)
    t = torch.randint(0, 1000, (N,), generator=g)
    labels = torch.tensor([0, 1, 2] * (N // 3) + [0] * (N % 3))  # 2 = the null class (a no-op row under guidance)
    return comps, router, x, t, labels


def test_guidance_scale_one_is_unguided_exactly(labelled):
    comps, router, x, t, labels = labelled
    den = ComposedDenoiser(comps, router, NAMES, vectorize="loop")
    plain = den.compose(x, t, labels)
    one = den.sampler(N, guidance_scale=1.0).compose(x, t, labels)
    assert torch.equal(one.eps, plain.eps) and torch.equal(one.weights, plain.weights) and one.null_weights is None
    assert all(c.rows == 2 * N for c in comps), "scale 1 runs no null branch"


@pytest.mark.parametrize("scale", [0.0, 3.0])
@pytest.mark.parametrize("subset", [[0, 1, 2], [0, 2]], ids=["abc", "ac"])
def test_guidance_matches_the_formula_with_per_branch_weights(labelled, scale, subset):
    comps, router, x, t, labels = labelled
    den = ComposedDenoiser(comps, router, NAMES, vectorize="loop")
    out = den.sampler(N, allowed=[NAMES[i] for i in subset], guidance_scale=scale).compose(x, t, labels)
    null = torch.full_like(labels, 2)
    # each branch is the exact sub-mixture eps of p(x | y) over S, with its own exact posterior weights
    eps_c = mixture_eps(comps, PRIORS, subset, x, t, labels)
    eps_null = mixture_eps(comps, PRIORS, subset, x, t, null)
    torch.testing.assert_close(out.eps, eps_null + scale * (eps_c - eps_null), rtol=1e-9, atol=1e-9)
    want_w = exact_posterior(comps, PRIORS, subset, x, t, labels)
    torch.testing.assert_close(out.weights, want_w, rtol=1e-9, atol=1e-12)
    assert out.null_weights is not None
    torch.testing.assert_close(
        out.null_weights, exact_posterior(comps, PRIORS, subset, x, t, null), rtol=1e-9, atol=1e-12
    )
    assert not torch.allclose(out.weights[labels < 2], out.null_weights[labels < 2], atol=1e-3), (
        "the branches must have different weights, or this test would not tell them apart"
    )
    # both branches in one forward pass per compartment, on [x; x]; none outside S
    for i, c in enumerate(comps):
        if i in subset:
            assert c.calls == 1 and torch.equal(seen_rows(c), torch.cat([x, x]))
        else:
            assert c.calls == 0


def test_guidance_needs_labels_and_a_valid_scale(labelled):
    comps, router, x, t, _ = labelled
    den = ComposedDenoiser(comps, router, NAMES)
    with pytest.raises(ConfigError, match="needs class labels"):
        den.sampler(N, guidance_scale=2.0).compose(x, t, None)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="guidance_scale"):
            den.sampler(N, guidance_scale=bad)
    unconditional = ComposedDenoiser(make_sources(), router, NAMES)
    with pytest.raises(ConfigError, match="class-conditional"):
        unconditional.sampler(N, guidance_scale=2.0)


def test_vectorised_and_loop_evaluation_agree() -> None:
    from cdm.compartment import Compartment, build_unet, new_manifest
    from cdm.config import TrainConfig
    from tests.cdm.conftest import TINY_MODEL

    torch.manual_seed(0)
    comps = [
        Compartment(
            build_unet(TINY_MODEL, 10).eval(),
            new_manifest(
                n, fingerprint="-", n_samples=1, class_counts=[], num_classes=10, model=TINY_MODEL, train=TrainConfig()
            ),
        )
        for n in NAMES
    ]

    class Logits(nn.Module):
        source_names = NAMES

        def forward(self, x, t, c):
            return x.flatten(1)[:, :3] * 3.0

    g = torch.Generator().manual_seed(1)
    x = torch.randn((7, 1, 8, 8), generator=g)
    t = torch.randint(0, 1000, (7,), generator=g)
    c = torch.tensor([0, 1, 2, 10, 4, 5, 6])
    loop = ComposedDenoiser(comps, Logits(), NAMES, vectorize="loop")
    vmap = loop.configured(vectorize="vmap")
    with torch.no_grad():
        torch.testing.assert_close(loop(x, t, c), vmap(x, t, c), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(loop(x, t, None), vmap(x, t, None), rtol=1e-4, atol=1e-5)
        sub = loop.configured(subset=["a", "c"])
        torch.testing.assert_close(sub(x, t, c), sub.configured(vectorize="vmap")(x, t, c), rtol=1e-4, atol=1e-5)
        # rows with different allowed sets cannot share one vmap call: the loop runs, with the same result
        mask = torch.tensor([[True, True, False], [False, True, True]] * 3 + [[True, False, False]])
        torch.testing.assert_close(
            loop.compose(x, t, c, allowed=mask).eps, vmap.compose(x, t, c, allowed=mask).eps, rtol=1e-6, atol=1e-6
        )
