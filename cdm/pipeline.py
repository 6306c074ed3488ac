"""``CompartmentalPipeline``: sampling from a composition (any routing kind) with any diffusers scheduler, with
attribution and classifier-free guidance."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline, DPMSolverMultistepScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

from cdm.attribution import Weighting, attribute, step_weights
from cdm.compose import Composed
from cdm.config import ModelConfig
from cdm.data import from_model_tensor
from cdm.errors import ConfigError
from cdm.guidance import check_guidance_scale


def make_scheduler(name: str, model: ModelConfig) -> SchedulerMixin:
    """A diffusers sampler sharing the training noise schedule of ``model``.

    Pixel-space samplers clip the predicted x_0 to [-1, 1] (improved-diffusion's ``clip_denoised``; dynamic
    thresholding for DPM-Solver++). DPM-Solver++ uses "leading" spacing: with the cosine schedule the last
    training step has alpha_bar ~ 0, where its data prediction x_0 = (x - sigma eps) / alpha diverges.
    """
    cfg = model.scheduler_config()
    common = {
        "num_train_timesteps": cfg["num_train_timesteps"],
        "beta_schedule": cfg["beta_schedule"],
        "prediction_type": "epsilon",
    }
    if name == "ddpm":
        return DDPMScheduler(**common, clip_sample=True)
    if name == "ddim":
        return DDIMScheduler(**common, clip_sample=True, set_alpha_to_one=False)
    if name == "dpm":
        return DPMSolverMultistepScheduler(
            **common,
            algorithm_type="dpmsolver++",
            solver_order=2,
            timestep_spacing="leading",
            steps_offset=1,
            thresholding=True,
            sample_max_value=1.0,
        )
    raise ConfigError(f"unknown scheduler {name!r}; choose one of ddpm, ddim, dpm")


@dataclass
class CompartmentalPipelineOutput(BaseOutput):
    """Samples and where they came from.

    images: uint8 (N, H, W, C). attribution: (N, K) the composition weights averaged over the sampling steps
    (cdm/attribution.py: the plain mean by default, so it leans to the priors by the share of high-noise steps;
    ``attribution_weighting`` "alpha_bar" / "snr" weights low-noise steps more), columns = ``source_names``; under
    guidance, the conditional branch's weights. trajectory: (T, N, K) weights per step when requested.
    timesteps: (T,). alphas_cumprod: (T,) alpha_bar at each step (for ``cdm.attribution.attribute``).
    """

    images: np.ndarray
    attribution: np.ndarray
    source_names: list[str]
    trajectory: np.ndarray | None = None
    timesteps: np.ndarray | None = None
    alphas_cumprod: np.ndarray | None = None


class CompartmentalPipeline(DiffusionPipeline):
    """Ancestral sampling x_T -> x_0 with the composed noise prediction of CDM, for any routing kind.

    Args:
        denoiser: the compartments composed under a routing kind (``ComposedDenoiser`` for "learnt",
            ``DensityComposition`` for "density"; ``cdm.routing.build_composition`` makes either).
        scheduler: the default diffusers sampler (``make_scheduler``).
    """

    def __init__(self, denoiser: Composed, scheduler: SchedulerMixin) -> None:
        super().__init__()
        self.register_modules(denoiser=denoiser, scheduler=scheduler)

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 16,
        class_labels: Sequence[int] | torch.Tensor | None = None,
        sources: Sequence[str] | None = None,
        top_k: int | torch.Tensor | None = None,
        num_inference_steps: int = 20,
        generator: torch.Generator | None = None,
        scheduler: SchedulerMixin | str | None = None,
        return_trajectory: bool = False,
        progress: bool = True,
        *,
        allowed: torch.Tensor | None = None,
        guidance_scale: float = 1.0,
        attribution_weighting: Weighting = "mean",
    ) -> CompartmentalPipelineOutput:
        """Sample ``batch_size`` images.

        Args:
            batch_size: images to sample (N).
            class_labels: one label per image, or one for all, or a shorter list repeated; None = unconditional.
            sources: the sources every image may use (access rights); None = all.
            top_k: learnt kind: each image mixes only its k most likely compartments per step (an int, or a (N,)
                tensor of k per image); None = the composition's own mode. 0 is an error.
            num_inference_steps: sampling steps.
            generator: the random generator (initial noise, stochastic steps, density probes).
            scheduler: a diffusers scheduler or a ``make_scheduler`` name; None = the pipeline's.
            return_trajectory: also return the (T, N, K) weights per step.
            progress: show a progress bar.
            allowed: (N, K) bool, per image the sources it may use (instead of ``sources``, for batches that mix
                requests with different rights); columns = ``denoiser.source_names``.
            guidance_scale: classifier-free guidance s (cdm/guidance.py; diffusers' name): 1 = none, > 1 guided.
                Needs class labels; without them it is a no-op.
            attribution_weighting: how ``attribution`` averages the steps: "mean", "alpha_bar" or "snr".
        """
        comp: Composed = self.denoiser
        device = comp.device
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if sources is not None and allowed is not None:
            raise ConfigError("pass either sources (one set for every image) or allowed (a mask per image), not both")
        step_weights(np.ones(1), attribution_weighting)  # an unknown weighting fails before sampling
        sched: SchedulerMixin
        if isinstance(scheduler, str):
            sched = make_scheduler(scheduler, comp.model_config)
        else:
            sched = scheduler if scheduler is not None else self.scheduler
        # 1. labels: None = unconditional (null class); else one per sample or broadcast
        labels = expand_labels(class_labels, batch_size, device, comp.num_classes)
        # 2. the denoiser of this call: per-image allowed sets and top k, guidance, a fresh trajectory (density)
        scale = check_guidance_scale(guidance_scale)
        den = comp.sampler(
            batch_size,
            allowed=allowed if allowed is not None else sources,
            top_k=top_k,
            guidance_scale=scale if labels is not None else 1.0,
            scheduler=sched,
            generator=generator,
        )
        x = torch.randn((batch_size, *comp.sample_shape), generator=generator).to(device)
        sched.set_timesteps(num_inference_steps)
        x = x * sched.init_noise_sigma
        traj = []
        # 3. denoising loop: eps = sum_i w_i eps_i (guided: per branch), then the scheduler step
        for t in self.progress_bar(sched.timesteps) if progress else sched.timesteps:
            model_in = sched.scale_model_input(x, t)
            out = den.compose(model_in, t.to(device).expand(batch_size), labels)
            traj.append(out.weights.float().cpu())
            x = sched.step(out.eps, t, x, generator=generator).prev_sample
        # 4. attribution: the weights averaged over the steps
        trajectory = torch.stack(traj).numpy()
        abar = sched.alphas_cumprod[sched.timesteps.cpu().long()].double().numpy()
        return CompartmentalPipelineOutput(
            images=from_model_tensor(x.cpu()),
            attribution=attribute(trajectory, abar, attribution_weighting).astype(np.float32),
            source_names=list(comp.source_names),
            trajectory=trajectory if return_trajectory else None,
            timesteps=sched.timesteps.cpu().numpy(),
            alphas_cumprod=abar,
        )


def expand_labels(
    class_labels: Sequence[int] | torch.Tensor | None, n: int, device: torch.device | str, num_classes: int
) -> torch.Tensor | None:
    """(N,) long labels on ``device``: one per sample, one for all, or a shorter list cycled; None stays None."""
    if class_labels is None:
        return None
    if num_classes == 0:
        raise ConfigError("these compartments are unconditional (their sources had no labels); drop the labels")
    c = torch.as_tensor(class_labels, dtype=torch.long).flatten()
    bad = c[(c < 0) | (c >= num_classes)]
    if bad.numel():
        raise ConfigError(f"class label {int(bad[0])} is out of range; labels must be in [0, {num_classes})")
    if c.numel() == 1:
        c = c.expand(n)
    elif c.numel() != n:
        c = c.repeat((n + c.numel() - 1) // c.numel())[:n]
    return c.to(device)
