"""Image attribution: which source does a given image look like? P(source | x_0, c) over the caller's sources, by
the method of the composition's routing kind. ``attribute_images`` (uint8 images) and ``attribute_tensors`` (model
space) dispatch on the kind; both return an ``ImageAttribution`` whose ``method`` names the method used.

Both noise the image along the forward process: for each requested timestep t and noise draw eps,
x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps with the compartments' training schedule (diffusers'
``DDPMScheduler.add_noise``). Low t sees the image almost clean, high t mostly noise.

* "router" (the learnt and heads kinds, ``ComposedDenoiser`` and its ``HeadsComposition``): w(x_t, t, c) =
  P(source | x_t, t, c) is the composition's weights function (the router, or the per-source heads, renormalised
  over the caller's sources, as when sampling). by_timestep[t] is the arithmetic mean of w over the draws (a Monte
  Carlo estimate of E_eps[w(x_t, t, c)]); the posterior is the mean of those over the timesteps. Only the router
  (or the heads) runs, never a compartment.

* "elbo" (the density kind, ``DensityComposition``; nothing trained, no router): each compartment's own diffusion
  ELBO is its log-likelihood (Li et al. 2023, "Your Diffusion Model is Secretly a Zero-Shot Classifier"; the
  Itô/ELBO view of SuperDiff, Skreta et al. 2024):

      log p_i(x_0 | c) ~ -sum_t W_t E_eps ||eps - eps_i(x_t, t, c)||^2 + C,   W_t = Delta_t lambda(t),

  lambda(t) = beta_t / (2 alpha_t (1 - abar_t)), the DDPM variational-bound weight of the eps-prediction loss with
  sigma_t^2 = beta_t (Ho et al. 2020, eq. 12; at t = 0 it is 1 / (2 alpha_0), the Gaussian decoder's term), and
  Delta_t the width of t's quadrature cell: the integer timesteps of [0, T) nearest to t (the cell boundaries are
  the midpoints between consecutive requested timesteps; copies of one timestep share its cell), so that with
  every timestep of [0, T) requested the sum is the full discrete bound. C (the forward process' entropy terms, the
  prior term) is the same for every compartment, which share the schedule. Then

      P(i | x_0, c) = softmax_{i in S}(log lambda_i + log p_i(x_0 | c)),

  lambda_i the composition's priors (n_samples, or P(i | c) from the class counts for a labelled image: the priors
  the density kind samples with, ``DensityComposition.row_priors``), S the caller's sources. Every compartment sees
  the same (t, eps) draws (common random numbers) and the draws come in antithetic pairs (eps, -eps), which cancels
  the term of ||eps - eps_i||^2 linear in eps, the largest part of the Monte Carlo noise at low t (measured on
  analytic Gaussian sources, all timesteps: TV max 0.009 with 16 paired draws, 0.036 with 64 independent ones).
  by_timestep[t] is the posterior from that timestep's term alone, softmax_{i in S}(log lambda_i - W_t mean_eps
  ||eps - eps_i||^2) (its weight in the sum included, so each shows what that timestep contributes); the posterior
  comes from the summed terms and is not the mean of by_timestep. Cost: every compartment in S runs once per
  timestep on draws x N rows. A compartment outside S, or with prior 0 for an image's class, never sees that image.
  Accuracy (tests/cdm/test_image_attribution.py, compartments with the exact eps of Gaussian-mixture sources in 16
  dims, cosine schedule): with all 1000 timesteps and 16 draws the total variation from the exact P(i | x_0) is
  0.013 at worst and 8e-4 on average over 48 points (log P within 0.14 nats wherever P > 1e-3); every 10th timestep
  with 8 draws: 0.12 / 0.005. The API's default (four timesteps, 8 draws) is a coarse quadrature of the bound: on
  the same points TV 0.18 at worst, 0.012 on average, the most likely source right for all 48.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from diffusers import DDPMScheduler

from cdm.compose import Composed, ComposedDenoiser
from cdm.data import to_model_tensor
from cdm.errors import ConfigError, DataError
from cdm.routing.density import DensityComposition

DEFAULT_TIMESTEPS = (50, 150, 300, 500)
DEFAULT_DRAWS = 8

Method = Literal["router", "elbo"]


@dataclass(frozen=True)
class ImageAttribution:
    """P(source | image) over ``sources`` for each image.

    posterior: (N, K); by_timestep: (T, N, K) in ``timesteps`` order; columns are ``sources`` (exactly the sources
    considered, nothing else, in the composition's order). method "router" (learnt, heads): by_timestep is the
    router's posterior averaged over the draws, posterior their mean over the timesteps. method "elbo" (density
    kind): by_timestep is the posterior from one timestep's weighted ELBO term alone, posterior the one from the
    summed terms (see the module docstring).
    """

    sources: list[str]
    posterior: np.ndarray
    by_timestep: np.ndarray
    timesteps: tuple[int, ...]
    draws: int
    method: Method = "router"


def _match_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """uint8 (N,H,W[,C]) with C converted to ``channels`` (RGB -> luminance, grey -> RGB); alpha dropped."""
    imgs = images[..., None] if images.ndim == 3 else images
    if imgs.ndim != 4:
        raise DataError(f"images must be (N,H,W) or (N,H,W,C); got shape {images.shape}")
    if imgs.shape[-1] == 4:
        imgs = imgs[..., :3]
    have = imgs.shape[-1]
    if have == channels:
        return imgs
    if have == 3 and channels == 1:
        grey = imgs.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        return np.clip(np.rint(grey), 0, 255).astype(np.uint8)[..., None]
    if have == 1 and channels == 3:
        return np.repeat(imgs, 3, axis=-1)
    raise DataError(f"images have {have} channels; the compartments take {channels} (1 grey or 3 RGB)")


def attribute_images(
    denoiser: Composed,
    images: np.ndarray,
    *,
    sources: Sequence[str] | None = None,
    timesteps: Sequence[int] = DEFAULT_TIMESTEPS,
    draws: int = DEFAULT_DRAWS,
    class_labels: Sequence[int] | None = None,
    seed: int = 0,
) -> ImageAttribution:
    """Posterior over ``sources`` (default: all of the composition) for uint8 ``images`` (N,H,W[,C]).

    Args:
        denoiser: the composition: a ``ComposedDenoiser`` (learnt and heads kinds: its router's posterior, no
            compartment runs) or a ``DensityComposition`` (density kind: the ELBOs of the compartments in ``sources``).
        images: uint8 images of any size; resized to the model's sample size, channels converted.
        sources: the subset the posterior is over (access rights); None = every source of the composition.
        timesteps: forward-process timesteps in [0, num_train_timesteps).
        draws: noise draws per timestep.
        class_labels: one label per image (or one for all); None = unconditional (the null class).
        seed: seeds the noise draws.
    """
    if images.dtype != np.uint8:
        raise DataError(f"images must be uint8; got {images.dtype}")
    channels, size, _ = denoiser.sample_shape
    # the clean images as model tensors (N, C, S, S) in [-1, 1]
    x0 = to_model_tensor(_match_channels(images, channels), size)
    return attribute_tensors(
        denoiser, x0, sources=sources, timesteps=timesteps, draws=draws, class_labels=class_labels, seed=seed
    )


@torch.no_grad()
def attribute_tensors(
    denoiser: Composed,
    x0: torch.Tensor,
    *,
    sources: Sequence[str] | None = None,
    timesteps: Sequence[int] = DEFAULT_TIMESTEPS,
    draws: int = DEFAULT_DRAWS,
    class_labels: Sequence[int] | torch.Tensor | None = None,
    seed: int = 0,
) -> ImageAttribution:
    """``attribute_images`` for clean samples already in model space: ``x0`` (N, C, H, W) as the compartments were
    trained on (``sample_shape``). The same arguments otherwise; the noise is drawn in ``x0``'s dtype."""
    if draws < 1:
        raise ConfigError(f"draws = {draws} must be >= 1")
    if isinstance(denoiser, ComposedDenoiser):
        top = denoiser.model_config.num_train_timesteps
    elif isinstance(denoiser, DensityComposition):
        top = len(denoiser.alphas_cumprod)
    else:
        raise ConfigError(
            f"image attribution knows the router kinds (learnt, heads) and the density kind (ELBO); got a "
            f"{type(denoiser).__name__} of kind {getattr(denoiser, 'kind', None)!r}"
        )
    if not timesteps or any(not 0 <= int(t) < top for t in timesteps):
        raise ConfigError(f"timesteps {list(timesteps)} must be non-empty and in [0, {top})")
    ts = tuple(int(t) for t in timesteps)
    if x0.ndim != 4 or tuple(x0.shape[1:]) != denoiser.sample_shape:
        raise DataError(f"x0 must be (N, *{denoiser.sample_shape}) in model space; got {tuple(x0.shape)}")
    n = x0.shape[0]
    if n == 0:
        raise DataError("no image to attribute")
    labels = _labels(class_labels, n, denoiser.num_classes)
    x0 = x0.to(denoiser.device)
    if isinstance(denoiser, ComposedDenoiser):
        return _router_posterior(denoiser, x0, sources, ts, draws, labels, seed)
    return _elbo_posterior(denoiser, x0, sources, ts, draws, labels, seed)


def _labels(class_labels: Sequence[int] | torch.Tensor | None, n: int, num_classes: int) -> torch.Tensor | None:
    """(N,) long labels checked against the compartments' classes, or None (unconditional)."""
    if class_labels is None:
        return None
    c = torch.as_tensor(class_labels if isinstance(class_labels, torch.Tensor) else list(class_labels))
    c = c.long().flatten()
    if num_classes == 0:
        raise ConfigError("these compartments are unconditional (their sources had no labels); drop the label")
    bad = c[(c < 0) | (c >= num_classes)]
    if bad.numel():
        raise ConfigError(f"class label {int(bad[0])} is out of range; labels must be in [0, {num_classes})")
    if c.numel() == 1:
        return c.expand(n).clone()
    if c.numel() != n:
        raise ConfigError(f"{c.numel()} class labels for {n} images; give one per image or one for all")
    return c


def _router_posterior(
    denoiser: ComposedDenoiser,
    x0: torch.Tensor,
    sources: Sequence[str] | None,
    timesteps: tuple[int, ...],
    draws: int,
    labels: torch.Tensor | None,
    seed: int,
) -> ImageAttribution:
    """The learnt and heads kinds: the router's weights, averaged over the draws at each timestep, then over the
    timesteps."""
    den = denoiser.configured(subset=sources) if sources is not None else denoiser  # refuses a bare string
    used = [den.source_names[i] for i in den.subset]
    cols = [den.source_names.index(s) for s in used]
    device = x0.device
    n = x0.shape[0]
    rep_labels = labels.repeat(draws).to(device) if labels is not None else None
    sched = DDPMScheduler(**den.model_config.scheduler_config())
    g = torch.Generator().manual_seed(seed)
    per_t = []
    for t in timesteps:
        # 1. draws x N noised copies x_t ~ q(x_t | x_0), then the router's weights restricted to the sources
        x = x0.repeat(draws, 1, 1, 1)
        noise = torch.randn(x.shape, generator=g).to(device)
        tt = torch.full((x.shape[0],), t, dtype=torch.long, device=device)
        x_t = sched.add_noise(x, noise, tt)
        w = den.weights(x_t, tt, rep_labels).float().view(draws, n, -1)
        # 2. mean over the draws, columns = the sources used
        per_t.append(w.mean(0)[:, cols].cpu().numpy())
    by_t = np.stack(per_t).astype(np.float64)
    return ImageAttribution(
        sources=used, posterior=by_t.mean(0), by_timestep=by_t, timesteps=timesteps, draws=draws, method="router"
    )


def elbo_weights(alphas_cumprod: torch.Tensor, timesteps: Sequence[int]) -> torch.Tensor:
    """W_t = Delta_t lambda(t) (float64, one per entry of ``timesteps``): lambda(t) = beta_t / (2 alpha_t (1 - abar_t))
    from the schedule ``alphas_cumprod`` (T,), Delta_t the number of integer timesteps in [0, T) nearest to t (ties
    to the lower one) shared among the copies of t. All T timesteps once each: W = lambda."""
    abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()
    total = len(abar)
    alpha = abar / torch.cat([abar.new_ones(1), abar[:-1]])
    lam = (1 - alpha) / (2 * alpha * (1 - abar))
    nodes = sorted(set(int(t) for t in timesteps))
    if not nodes or nodes[0] < 0 or nodes[-1] >= total:
        raise ConfigError(f"timesteps {list(timesteps)} must be non-empty and in [0, {total})")
    # cell j = [b_j, b_{j+1}): b_0 = 0, b_k = T, between two nodes the first integer past their midpoint
    bounds = [0, *((a + b) // 2 + 1 for a, b in itertools.pairwise(nodes)), total]
    width = {t: bounds[j + 1] - bounds[j] for j, t in enumerate(nodes)}
    copies = {t: sum(1 for u in timesteps if int(u) == t) for t in nodes}
    return torch.tensor([width[int(t)] / copies[int(t)] * float(lam[int(t)]) for t in timesteps], dtype=torch.float64)


def _elbo_posterior(
    comp: DensityComposition,
    x0: torch.Tensor,
    sources: Sequence[str] | None,
    timesteps: tuple[int, ...],
    draws: int,
    labels: torch.Tensor | None,
    seed: int,
) -> ImageAttribution:
    """The density kind: softmax over S of log lambda_i - sum_t W_t mean_eps ||eps - eps_i(x_t, t, c)||^2."""
    n, device = x0.shape[0], x0.device
    mask = comp.allowed(sources, n, device)  # (N, K) within comp.subset; refuses a bare string
    columns = mask.any(0).nonzero(as_tuple=True)[0].tolist()  # S, composition order
    lam = comp.row_priors(columns, mask[:, columns], labels, strict=False)  # (N, S); 0: never evaluated on that row
    empty = (~(lam > 0).any(1)).nonzero(as_tuple=True)[0]
    if empty.numel():
        k = int(empty[0])
        names = [comp.source_names[i] for i in columns]
        if labels is None:  # (build_composition's priors are n_samples >= 1: a hand-made composition)
            raise ConfigError(f"every source in {names} has prior 0; give the composition positive priors")
        raise ConfigError(
            f"image {k}: none of the sources {names} has a positive prior for its class label {int(labels[k])} "
            "(no training data of that class); drop the label or attribute over other sources"
        )
    log_prior = lam.log()
    weights = elbo_weights(comp.alphas_cumprod, timesteps)
    abar = comp.alphas_cumprod.to(device)
    g = torch.Generator().manual_seed(seed)
    # rows of the (draws * N) batch, draw-major: image r of draw m is row m * N + r
    copies = torch.arange(draws, device=device)[:, None] * n
    rep_labels = labels.to(device).repeat(draws) if labels is not None else None
    terms = []
    for t, w in zip(timesteps, weights.tolist(), strict=True):
        # 1. draws x N noised copies, the same eps for every compartment, in antithetic pairs (eps, -eps)
        half = torch.randn((math.ceil(draws / 2), *x0.shape), generator=g, dtype=x0.dtype)
        eps = torch.cat([half, -half])[:draws].to(device).flatten(0, 1)
        a = abar[t].to(x0.dtype)  # DDPMScheduler.add_noise with the composition's schedule
        x_t = a.sqrt() * x0.repeat(draws, 1, 1, 1) + (1 - a).sqrt() * eps
        tt = torch.full((draws * n,), t, dtype=torch.long, device=device)
        # 2. mean squared eps error of every compartment in S on the rows with a positive prior for it
        sq = torch.zeros((n, len(columns)), dtype=torch.float64, device=device)
        for j, i in enumerate(columns):
            rows = (lam[:, j] > 0).nonzero(as_tuple=True)[0]
            if rows.numel() == 0:
                continue
            if rows.numel() == n:
                out, target = comp.compartments[i](x_t, tt, rep_labels), eps
            else:
                sel = (copies + rows[None, :]).flatten()
                c = rep_labels[sel] if rep_labels is not None else None
                out, target = comp.compartments[i](x_t[sel], tt[sel], c), eps[sel]
            err = (target - out).double().flatten(1).pow(2).sum(1)
            sq[rows, j] = err.view(draws, rows.numel()).mean(0)
        terms.append(-w * sq)
    # 3. the posterior from the summed terms, and from each term alone
    total = torch.stack(terms).sum(0)
    posterior = torch.softmax(log_prior + total, 1)
    by_t = torch.stack([torch.softmax(log_prior + term, 1) for term in terms])
    return ImageAttribution(
        sources=[comp.source_names[i] for i in columns],
        posterior=posterior.cpu().numpy(),
        by_timestep=by_t.cpu().numpy(),
        timesteps=timesteps,
        draws=draws,
        method="elbo",
    )
