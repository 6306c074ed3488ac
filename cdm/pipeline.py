"""``CompartmentalPipeline``: sampling from a ComposedDenoiser with any diffusers scheduler, with attribution."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline, DPMSolverMultistepScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

from cdm.compose import ComposedDenoiser
from cdm.config import ModelConfig
from cdm.data import from_model_tensor
from cdm.errors import ConfigError

SchedulerName = Literal["ddpm", "ddim", "dpm"]


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

    images: uint8 (N, H, W, C). attribution: (N, K) mean router weight over the trajectory, columns =
    ``source_names``. trajectory: (T, N, K) weights per step when requested. timesteps: (T,).
    """

    images: np.ndarray
    attribution: np.ndarray
    source_names: list[str]
    trajectory: np.ndarray | None = None
    timesteps: np.ndarray | None = None


class CompartmentalPipeline(DiffusionPipeline):
    """Ancestral sampling x_T -> x_0 with the composed noise prediction of CDM."""

    def __init__(self, denoiser: ComposedDenoiser, scheduler: SchedulerMixin) -> None:
        super().__init__()
        self.register_modules(denoiser=denoiser, scheduler=scheduler)

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 16,
        class_labels: Sequence[int] | torch.Tensor | None = None,
        sources: Sequence[str] | None = None,
        top_k: int | None = None,
        num_inference_steps: int = 20,
        generator: torch.Generator | None = None,
        scheduler: SchedulerMixin | str | None = None,
        return_trajectory: bool = False,
        progress: bool = True,
        **_: Any,
    ) -> CompartmentalPipelineOutput:
        base: ComposedDenoiser = self.denoiser
        device = next(base.parameters()).device
        # 1. the denoiser for this request: access subset and routing mode
        den = base.configured(
            subset=list(sources) if sources is not None else None,
            mode="top_k" if top_k is not None else None,
            top_k=top_k,
        )
        sched: SchedulerMixin
        if isinstance(scheduler, str):
            sched = make_scheduler(scheduler, base.model_config)
        else:
            sched = scheduler if scheduler is not None else self.scheduler
        # 2. labels: None = unconditional (null class); else one per sample or broadcast
        labels = _labels(class_labels, batch_size, device, base.num_classes)
        x = torch.randn((batch_size, *base.sample_shape), generator=generator).to(device)
        sched.set_timesteps(num_inference_steps)
        x = x * sched.init_noise_sigma
        traj = []
        # 3. denoising loop: eps = sum_i w_i eps_i, then the scheduler step
        for t in self.progress_bar(sched.timesteps) if progress else sched.timesteps:
            model_in = sched.scale_model_input(x, t)
            eps = den(model_in, t.to(device).expand(batch_size), labels)
            assert den.last_weights is not None
            traj.append(den.last_weights.cpu())
            x = sched.step(eps, t, x, generator=generator).prev_sample
        trajectory = torch.stack(traj).numpy()
        return CompartmentalPipelineOutput(
            images=from_model_tensor(x.cpu()),
            attribution=trajectory.mean(0),
            source_names=list(den.source_names),
            trajectory=trajectory if return_trajectory else None,
            timesteps=sched.timesteps.cpu().numpy(),
        )


def _labels(
    class_labels: Sequence[int] | torch.Tensor | None, n: int, device: torch.device, num_classes: int
) -> torch.Tensor | None:
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
