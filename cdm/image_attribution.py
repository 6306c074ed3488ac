"""Image attribution: which source does a given image look like? The router's posterior for the image noised along
the forward process (the learnt routing kind; the density kind has no single-image posterior yet).

For an image x_0, each timestep t and noise draw eps: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (diffusers'
``DDPMScheduler.add_noise`` with the compartments' training schedule), and w(x_t, t, c) = P(source | x_t, t, c) is
the composition's weights function (the router renormalised over the caller's sources, as when sampling). The
posterior reported per timestep is the arithmetic mean of w over the draws (a Monte Carlo estimate of
E_eps[w(x_t, t, c)]); the overall posterior is the mean of those over the timesteps. Low t sees the image almost
clean (the most discriminative), high t mostly noise (close to the priors).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DDPMScheduler

from cdm.compose import Composed, ComposedDenoiser
from cdm.data import to_model_tensor
from cdm.errors import ConfigError, DataError

DEFAULT_TIMESTEPS = (50, 150, 300, 500)
DEFAULT_DRAWS = 8


@dataclass(frozen=True)
class ImageAttribution:
    """The router's posterior over ``sources`` for each image.

    posterior: (N, K) mean over timesteps; by_timestep: (T, N, K) mean over the noise draws at each timestep;
    columns are ``sources`` (exactly the sources considered, nothing else).
    """

    sources: list[str]
    posterior: np.ndarray
    by_timestep: np.ndarray
    timesteps: tuple[int, ...]
    draws: int


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


@torch.no_grad()
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
        denoiser: the composition; only its router (weights function) is evaluated, never a compartment.
        images: uint8 images of any size; resized to the model's sample size, channels converted.
        sources: the subset the posterior is renormalised over (access rights); None = every source.
        timesteps: forward-process timesteps in [0, num_train_timesteps).
        draws: noise draws per timestep (averaged).
        class_labels: one label per image (or one for all); None = unconditional (the null class).
        seed: seeds the noise draws.
    """
    if not isinstance(denoiser, ComposedDenoiser):
        raise ConfigError(
            f"image attribution reads a router's posterior; this composition is of the {denoiser.kind!r} routing kind, "
            'which has no router (use a registry or store with [router] kind = "learnt")'
        )
    model = denoiser.model_config
    if images.dtype != np.uint8:
        raise DataError(f"images must be uint8; got {images.dtype}")
    if draws < 1:
        raise ConfigError(f"draws = {draws} must be >= 1")
    if not timesteps or any(not 0 <= int(t) < model.num_train_timesteps for t in timesteps):
        raise ConfigError(f"timesteps {list(timesteps)} must be non-empty and in [0, {model.num_train_timesteps})")
    den = denoiser.configured(subset=list(sources)) if sources is not None else denoiser
    used = [den.source_names[i] for i in den.subset]
    cols = [den.source_names.index(s) for s in used]
    device = next(den.parameters()).device
    # 1. the clean images as model tensors (N, C, S, S) in [-1, 1]
    x0 = to_model_tensor(_match_channels(images, model.in_channels), model.sample_size).to(device)
    n = x0.shape[0]
    if n == 0:
        raise DataError("no image to attribute")
    labels = None
    if class_labels is not None:
        c = torch.as_tensor(list(class_labels), dtype=torch.long).flatten()
        if den.num_classes == 0:
            raise ConfigError("these compartments are unconditional (their sources had no labels); drop the label")
        bad = c[(c < 0) | (c >= den.num_classes)]
        if bad.numel():
            raise ConfigError(f"class label {int(bad[0])} is out of range; labels must be in [0, {den.num_classes})")
        if c.numel() == 1:
            c = c.expand(n)
        elif c.numel() != n:
            raise ConfigError(f"{c.numel()} class labels for {n} images; give one per image or one for all")
        labels = c.repeat(draws).to(device)
    sched = DDPMScheduler(**model.scheduler_config())
    g = torch.Generator().manual_seed(seed)
    per_t = []
    for t in timesteps:
        # 2. draws x N noised copies x_t ~ q(x_t | x_0), then the router's weights restricted to the sources
        x = x0.repeat(draws, 1, 1, 1)
        noise = torch.randn(x.shape, generator=g).to(device)
        tt = torch.full((x.shape[0],), int(t), dtype=torch.long, device=device)
        x_t = sched.add_noise(x, noise, tt)
        w = den.weights(x_t, tt, labels).float().view(draws, n, -1)
        # 3. mean over the draws, columns = the sources used
        per_t.append(w.mean(0)[:, cols].cpu().numpy())
    by_t = np.stack(per_t).astype(np.float64)
    return ImageAttribution(
        sources=used, posterior=by_t.mean(0), by_timestep=by_t, timesteps=tuple(int(t) for t in timesteps), draws=draws
    )
