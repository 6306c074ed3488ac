"""Attribution: which sources a sample came from, read off the composition weights along its sampling trajectory.

attribution_n = sum_k a_k w_n(t_k) / sum_k a_k over the sampling steps k (each row sums to one), with a_k:

    "mean"       1: the plain mean of the weights over the steps, the default. At high noise every source's
                 noised marginal is ~N(0, I), so there w_n(t) is close to the priors lambda_i (over the allowed set):
                 the mean leans towards the priors by the share of steps spent at high noise.
    "alpha_bar"  alpha_bar_{t_k}: low-noise steps, where the posterior has made up its mind, dominate; the
                 high-noise steps (alpha_bar ~ 0) count for almost nothing.
    "snr"        alpha_bar / (1 - alpha_bar): essentially the last few steps.

Under classifier-free guidance the weights are the conditional branch's, P(i | x_t, c). Whether a low-noise weighting
agrees better with the ground truth (the by-class split: each class comes from one source) is measured by the
benchmarks with ``attribution_agreement``.
"""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np
import torch

from cdm.errors import ConfigError

Weighting = Literal["mean", "alpha_bar", "snr"]
WEIGHTINGS: tuple[Weighting, ...] = get_args(Weighting)


def step_weights(alphas_cumprod: np.ndarray | torch.Tensor, weighting: Weighting) -> np.ndarray:
    """a_k (T,) for the alpha_bar of each sampling step (``scheduler.alphas_cumprod[timesteps]``)."""
    abar = np.asarray(alphas_cumprod, dtype=np.float64)
    if weighting == "mean":
        return np.ones_like(abar)
    if weighting == "alpha_bar":
        return abar
    if weighting == "snr":
        return abar / (1 - abar)
    raise ConfigError(f"attribution weighting {weighting!r} is not one of {list(WEIGHTINGS)}")


def attribute(
    trajectory: np.ndarray | torch.Tensor,
    alphas_cumprod: np.ndarray | torch.Tensor | None = None,
    weighting: Weighting = "mean",
) -> np.ndarray:
    """(N, K) attribution from the (T, N, K) weights per step; ``alphas_cumprod`` (T,) is needed unless "mean"."""
    traj = np.asarray(trajectory, dtype=np.float64)
    if traj.ndim != 3 or traj.shape[0] == 0:
        raise ConfigError(f"a trajectory is (steps, rows, sources) weights with at least one step, got {traj.shape}")
    if alphas_cumprod is None:
        if weighting != "mean":
            raise ConfigError(f"attribution weighting {weighting!r} needs the alpha_bar of each step")
        return traj.mean(0)
    a = step_weights(alphas_cumprod, weighting)
    if a.shape != (traj.shape[0],):
        raise ConfigError(f"{traj.shape[0]} steps of weights but {a.shape} alpha_bar values")
    return np.einsum("k,knj->nj", a, traj) / a.sum()


def dominant_agreement(attribution: np.ndarray, truth: np.ndarray) -> float:
    """Share of samples whose dominant source (argmax of attribution, (N, K)) is ``truth`` (N,) (source indices)."""
    att, true = np.asarray(attribution), np.asarray(truth)
    if att.ndim != 2 or true.shape != (att.shape[0],):
        raise ConfigError(f"attribution must be (N, K) and truth (N,), got {att.shape} and {true.shape}")
    return float((att.argmax(1) == true).mean())


def attribution_agreement(
    trajectory: np.ndarray | torch.Tensor, alphas_cumprod: np.ndarray | torch.Tensor, truth: np.ndarray
) -> dict[Weighting, float]:
    """For the benchmark: dominant-source agreement with the ground truth under every weighting.

    Args:
        trajectory: (T, N, K) weights per sampling step (``CompartmentalPipelineOutput.trajectory``).
        alphas_cumprod: (T,) alpha_bar at each step (``CompartmentalPipelineOutput.alphas_cumprod``).
        truth: (N,) index of each sample's true source (on the by-class split: its class's source, the class
            read by the metrics classifier).
    """
    return {w: dominant_agreement(attribute(trajectory, alphas_cumprod, w), truth) for w in WEIGHTINGS}
