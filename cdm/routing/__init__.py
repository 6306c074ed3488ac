"""Routing: the weights w_i(x_t, t, c) = P(source i | x_t, t, c) of the composition, behind one interface.

A routing kind (``[router] kind``, also a registry fact) says how compartments are composed:

    "learnt"   learnt.py: a timestep- and class-conditioned CNN classifier over the sources, trained on every
               source's noised data (``ComposedDenoiser``; retrained whenever a source is added or forgotten)
    "density"  density.py: training-free SuperDiff weights from each compartment's own scores along the sampling
               trajectory (``DensityComposition``); nothing is trained on any source, priors come from n_samples
    "heads"    heads.py: a small density-ratio head per compartment, trained on that source alone against N(0, I) and
               stored in the compartment (``HeadsComposition``: logits log lambda_i + h_i); forgotten with it, and
               top-k works (top-1: one compartment pass + |S| head passes per step)

``build_composition`` makes any of them from loaded compartments; both are ``cdm.compose.Composed``: the pipeline asks
one for ``sampler(n, allowed=..., top_k=..., guidance_scale=..., scheduler=..., generator=...)``, the denoiser of one
sampling call (a fresh density trajectory per call, its estimator picked from the scheduler). ``serving`` says which
active compartments a kind can serve.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, get_args

import torch
from diffusers import DDPMScheduler
from torch import nn

from cdm.compose import Composed, ComposedDenoiser, Vectorize
from cdm.config import RoutingKind
from cdm.errors import ConfigError
from cdm.routing.density import DensityComposition, DensityTrajectory, PruneConfig, estimator_for
from cdm.routing.heads import HeadsComposition, HeadsRouter, head_network, heads_of, train_head
from cdm.routing.learnt import (
    CONFIG,
    NOISE_BINS,
    WEIGHTS,
    Router,
    RouterManifest,
    RouterReport,
    RouterResult,
    load_router,
    save_router,
    train_router,
)

ROUTING_KINDS: tuple[RoutingKind, ...] = get_args(RoutingKind)


def check_kind(kind: str) -> RoutingKind:
    """``kind`` if it is a routing kind, else ConfigError naming the kinds."""
    for known in ROUTING_KINDS:
        if kind == known:
            return known
    raise ConfigError(f"routing kind {kind!r} is not one of {list(ROUTING_KINDS)}")


def needs_router(kind: str) -> bool:
    """Whether compositions of ``kind`` need a trained router (so the daemon must keep cross-source data): only
    "learnt" ("heads" keeps its heads inside the compartments)."""
    return check_kind(kind) == "learnt"


def serving(kind: str, active: Sequence[str], routed: Sequence[str] | None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(served, pending) among the ``active`` compartment ids: "learnt" serves those the router covers (``routed``,
    None when there is no router: nothing), the rest wait for the next router; "heads" those that carry a head
    (``routed``: their ids, ``cdm.compartment.has_head`` of their files; None: every active one); "density" serves
    every active one."""
    kind = check_kind(kind)
    if kind == "density" or (kind == "heads" and routed is None):
        return tuple(active), ()
    covered = set(routed or ())
    return tuple(c for c in active if c in covered), tuple(c for c in active if c not in covered)


def build_composition(
    kind: str,
    compartments: Sequence[nn.Module],
    names: Sequence[str],
    *,
    router: nn.Module | None = None,
    router_names: Sequence[str] | None = None,
    n_samples: Sequence[int] | None = None,
    class_counts: Sequence[Sequence[int]] | None = None,
    vectorize: Vectorize = "auto",
    prune: PruneConfig | None = None,
    subset: Sequence[str] | None = None,
) -> Composed:
    """Compartments composed under routing ``kind``.

    Args:
        kind: "learnt", "density" or "heads".
        compartments: loaded compartments (``cdm.compartment.Compartment``), one per name; under "heads" each must
            carry its head (``Compartment.head``).
        names: their source names (the columns of weights and attribution).
        router: the learnt router (required by "learnt", refused by the others).
        router_names: the router's logit columns when they are not ``router.source_names`` (e.g. registry ids).
        n_samples: training samples per compartment: the density and heads kinds' priors lambda_i = n_i / sum_j n_j
            (default: uniform). The learnt router has its priors built in.
        class_counts: samples per class per compartment: P(i | c) proportional to n_{i,c} for labelled rows of the
            density and heads kinds (a zero count means compartment i never runs on class c); ignored unless every
            compartment has ``num_classes`` counts.
        vectorize: how the learnt and heads kinds evaluate compartments (``[sample] vectorize``).
        prune: density kind: drop a compartment from a row once its weight stayed negligible (an approximation,
            off by default; see ``PruneConfig``). Refused by "learnt", whose cheap approximation is top-k.
        subset: the sources the composition may ever use (access rights); None = all.
    """
    kind = check_kind(kind)
    if not compartments:
        raise ConfigError("nothing to compose: no compartments")
    if kind == "learnt":
        if router is None:
            raise ConfigError("the learnt routing kind needs a trained router; train one or use kind 'density'")
        if prune is not None:
            raise ConfigError("pruning applies to the density routing kind; the learnt kind's approximation is top_k")
        return ComposedDenoiser(
            compartments, router, names, router_names=router_names, vectorize=vectorize, subset=subset
        )
    if router is not None:
        raise ConfigError(f"the {kind} routing kind uses no router; pass router=None")
    priors = None
    if n_samples is not None:
        if len(n_samples) != len(names) or any(n < 1 for n in n_samples):
            raise ConfigError(f"n_samples must be one count >= 1 per compartment {list(names)}, got {list(n_samples)}")
        priors = torch.tensor([float(n) for n in n_samples], dtype=torch.float64)
    first: Any = compartments[0]
    num_classes = int(first.num_classes)
    class_priors = None
    if class_counts is not None and num_classes > 0 and all(len(c) == num_classes for c in class_counts):
        class_priors = torch.tensor([[float(x) for x in c] for c in class_counts], dtype=torch.float64)
    if kind == "heads":
        if prune is not None:
            raise ConfigError("pruning applies to the density routing kind; the heads kind's approximation is top_k")
        heads = HeadsRouter(heads_of(compartments, names), names, priors=priors, class_priors=class_priors)
        return HeadsComposition(compartments, heads, names, vectorize=vectorize, subset=subset)
    alphas_cumprod = DDPMScheduler(**first.manifest.model_config.scheduler_config()).alphas_cumprod
    return DensityComposition(
        compartments,
        names,
        alphas_cumprod,
        priors=priors,
        class_priors=class_priors,
        subset=subset,
        estimator="auto",
        prune=prune,
    )


def compose_trained(kind: str, compartments: Sequence[Any], names: Sequence[str], **options: Any) -> Composed:
    """``build_composition`` of trained compartments with their own priors: n_samples and class counts from each
    compartment's manifest (as a sampler takes them from the registry records). ``options``: build_composition's
    other keywords (router, vectorize, prune, subset, ...)."""
    return build_composition(
        kind,
        compartments,
        names,
        n_samples=[c.manifest.n_samples for c in compartments],
        class_counts=[c.manifest.class_counts for c in compartments],
        **options,
    )


__all__ = [
    "CONFIG",
    "NOISE_BINS",
    "ROUTING_KINDS",
    "WEIGHTS",
    "Composed",
    "ComposedDenoiser",
    "DensityComposition",
    "DensityTrajectory",
    "HeadsComposition",
    "HeadsRouter",
    "PruneConfig",
    "Router",
    "RouterManifest",
    "RouterReport",
    "RouterResult",
    "RoutingKind",
    "build_composition",
    "check_kind",
    "compose_trained",
    "estimator_for",
    "head_network",
    "heads_of",
    "load_router",
    "needs_router",
    "save_router",
    "serving",
    "train_head",
    "train_router",
]
