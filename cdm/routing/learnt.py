"""The router: w_i(x_t, t, c) = P(source i | x_t, t, c), a timestep- and class-conditioned CNN.

Trained with cross-entropy on x_t = sqrt(a_t) x_0 + sqrt(1-a_t) eps, x_0 drawn uniformly from the pooled sources,
so its optimum is the mixture posterior with priors lambda_i = n_i / N (and P(i | c) proportional to n_{i,c});
CDM, Golatkar et al. 2023, eq. 4.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import SAFETENSORS_WEIGHTS_NAME
from torch import nn
from tqdm.auto import tqdm

import cdm
from cdm.artifacts import (
    MANIFEST,
    atomic_directory,
    hash_tree,
    load_tensors,
    read_json,
    verify_tree,
    write_json,
)
from cdm.compartment import class_input
from cdm.config import ModelConfig, RouterConfig, to_dict
from cdm.data import SourceData, fingerprint, to_model_tensor
from cdm.denoiser import expand_timesteps
from cdm.errors import ConfigError, IntegrityError
from cdm.training import resolve_device

WEIGHTS = SAFETENSORS_WEIGHTS_NAME  # diffusers' save_pretrained name: diffusion_pytorch_model.safetensors
CONFIG = "config.json"
NOISE_BINS = 10


class _FiLMBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, emb: int, groups: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm1 = nn.GroupNorm(min(groups, c_out), c_out)
        self.film = nn.Linear(emb, 2 * c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(min(groups, c_out), c_out)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.norm1(self.conv1(x)))
        scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)
        h = h * (1 + scale) + shift
        h = F.silu(self.norm2(self.conv2(h)))
        return h + self.skip(x)


class Router(ModelMixin, ConfigMixin):
    """Source classifier: logits (N, K) of P(source | x_t, t, c)."""

    config_name = CONFIG

    @register_to_config
    def __init__(
        self,
        source_names: Sequence[str] = ("a",),
        in_channels: int = 1,
        sample_size: int = 16,
        channels: Sequence[int] = (32, 64),
        num_classes: int = 0,
        num_train_timesteps: int = 1000,
        emb_dim: int = 128,
    ) -> None:
        super().__init__()
        self.source_names = list(source_names)
        self.num_classes = num_classes
        self.num_train_timesteps = num_train_timesteps
        self.time_proj = Timesteps(64, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_emb = TimestepEmbedding(64, emb_dim)
        self.class_emb = nn.Embedding(num_classes + 1, emb_dim) if num_classes > 0 else None
        self.stem = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        blocks = []
        c_prev = channels[0]
        for c in channels:
            blocks.append(_FiLMBlock(c_prev, c, emb_dim, 8))
            c_prev = c
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Sequential(
            nn.Linear(c_prev + emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, len(source_names))
        )

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        n = x_t.shape[0]
        tt = expand_timesteps(t, n, x_t.device)
        emb = self.time_emb(self.time_proj(tt).to(x_t.dtype))
        c = class_input(class_labels, n, self.num_classes, x_t.device)
        if self.class_emb is not None and c is not None:
            emb = emb + self.class_emb(c)
        h = self.stem(x_t)
        for i, block in enumerate(self.blocks):
            h = block(h, emb)
            if i < len(self.blocks) - 1:
                h = F.avg_pool2d(h, 2)
        pooled = h.mean(dim=(2, 3))
        return self.head(torch.cat([pooled, emb], dim=1))


@dataclass(frozen=True)
class RouterReport:
    """Held-out quality of the router: accuracy per noise level and calibration."""

    source_names: list[str]
    priors: list[float]  # lambda_i = n_i / N
    accuracy_by_noise: list[float]  # top-1 accuracy (class hidden) in NOISE_BINS equal bins of t, low noise first
    mean_weights_by_noise: list[list[float]]  # mean w over held-out samples per noise bin
    accuracy: float  # overall held-out accuracy
    ece: float  # expected calibration error (15 bins) of the max probability
    steps: int
    final_loss: float
    train_seconds: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class RouterManifest:
    source_names: list[str]
    fingerprints: dict[str, str]  # source -> data fingerprint the router was trained on
    n_samples: dict[str, int]
    num_classes: int
    model: dict[str, Any]
    router: dict[str, Any]
    report: dict[str, Any]
    sha256: dict[str, str] = field(default_factory=dict)
    created_at: float = 0.0
    library_version: str = cdm.__version__
    format: int = 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class RouterResult:
    router: Router
    manifest: RouterManifest
    report: RouterReport


def save_router(router: Router, manifest: RouterManifest, directory: Path) -> RouterManifest:
    """config.json + safetensors + manifest.json (with sha256s), atomically."""
    with atomic_directory(Path(directory)) as tmp:
        router.save_pretrained(tmp, safe_serialization=True)  # config.json + diffusion_pytorch_model.safetensors
        manifest = dataclasses.replace(manifest, sha256=hash_tree(tmp), created_at=manifest.created_at or time.time())
        write_json(tmp / MANIFEST, manifest.to_dict())
    return manifest


def load_router(
    directory: Path, *, device: str | torch.device = "cpu", expected_sha256: Mapping[str, str] | None = None
) -> tuple[Router, RouterManifest]:
    """Verify sha256s, then rebuild the router from its own config."""
    directory = Path(directory)
    manifest = RouterManifest(**read_json(directory / MANIFEST))
    if expected_sha256 is not None and dict(expected_sha256) != manifest.sha256:
        raise IntegrityError(f"{directory}: router manifest differs from the sha256s recorded by the registry")
    verify_tree(directory, {k: v for k, v in manifest.sha256.items() if k != WEIGHTS})
    router = Router.from_config(json.loads((directory / CONFIG).read_text()))
    router.load_state_dict(load_tensors(directory / WEIGHTS, expected_sha256=manifest.sha256.get(WEIGHTS, "")))
    router.eval().requires_grad_(False)
    return router.to(device), manifest


def _ece(conf: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for lo, hi in itertools.pairwise(edges):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            total += m.mean() * abs(conf[m].mean() - correct[m].mean())
    return float(total)


def train_router(
    datasets: Mapping[str, SourceData],
    *,
    model: ModelConfig,
    router: RouterConfig,
    num_classes: int,
    progress: bool = True,
    should_stop: Callable[[], bool] | None = None,
) -> RouterResult:
    """Fit w_i(x_t, t, c) by cross-entropy on noised samples of the pooled sources (order = ``datasets`` order)."""
    started = time.perf_counter()
    names = list(datasets)
    if not names:
        raise ConfigError("train_router needs at least one source")
    device = resolve_device(router.device)
    if router.threads > 0:
        torch.set_num_threads(router.threads)
    torch.manual_seed(router.seed)
    g = torch.Generator().manual_seed(router.seed)
    # 1. pool the sources, hold out a small evaluation split per source
    xs, ys, cs, ev_x, ev_y = [], [], [], [], []
    for i, name in enumerate(names):
        d = datasets[name]
        x = to_model_tensor(d.images, model.sample_size)
        c = (
            torch.as_tensor(d.labels, dtype=torch.long)
            if (d.labels is not None and num_classes)
            else torch.full((len(d),), num_classes, dtype=torch.long)
        )
        perm = torch.randperm(len(x), generator=g)
        n_ev = min(max(1, len(x) // 10), router.eval_samples // max(1, len(names)) + 1) if len(x) > 1 else 0
        ev, tr = perm[:n_ev], perm[n_ev:]
        xs.append(x[tr])
        cs.append(c[tr])
        ys.append(torch.full((len(tr),), i, dtype=torch.long))
        ev_x.append(x[ev])
        ev_y.append(torch.full((len(ev),), i, dtype=torch.long))
    x_all, y_all, c_all = torch.cat(xs), torch.cat(ys), torch.cat(cs)
    counts = torch.bincount(y_all, minlength=len(names)).float()
    priors = (counts / counts.sum()).tolist()
    net = Router(
        source_names=names,
        in_channels=model.in_channels,
        sample_size=model.sample_size,
        channels=tuple(router.channels),
        num_classes=num_classes,
        num_train_timesteps=model.num_train_timesteps,
    ).to(device)
    sched = DDPMScheduler(**model.scheduler_config())
    opt = torch.optim.AdamW(net.parameters(), lr=router.lr)
    losses: list[float] = []
    step = 0
    # 2. cross-entropy on noised samples drawn uniformly from the pool (this is what absorbs the priors)
    if len(names) > 1:
        bar = tqdm(range(router.steps), desc="router", disable=not progress, dynamic_ncols=True, leave=False)
        for step in bar:
            if should_stop is not None and should_stop():
                break
            idx = torch.randint(0, len(x_all), (router.batch_size,), generator=g)
            x0, y, c = x_all[idx].to(device), y_all[idx].to(device), c_all[idx].to(device)
            t = torch.randint(0, model.num_train_timesteps, (len(idx),), generator=g).to(device)
            noise = torch.randn(x0.shape, generator=g).to(device)
            x_t = sched.add_noise(x0, noise, t)
            if num_classes:
                drop = (torch.rand(len(idx), generator=g) < router.label_dropout).to(device)
                c = torch.where(drop, torch.full_like(c, num_classes), c)
            for pg in opt.param_groups:  # cosine decay
                pg["lr"] = router.lr * 0.5 * (1 + np.cos(np.pi * step / max(1, router.steps)))
            loss = F.cross_entropy(net(x_t, t, c), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if step % 20 == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        step = len(losses)
    net.eval().requires_grad_(False)
    # 3. held-out report: accuracy per noise bin, mean weights per bin, ECE
    report = _evaluate(net, torch.cat(ev_x), torch.cat(ev_y), sched, device, priors, router, g)
    report = dataclasses.replace(
        report,
        steps=step,
        final_loss=float(np.mean(losses[-50:])) if losses else 0.0,
        train_seconds=time.perf_counter() - started,
    )
    manifest = RouterManifest(
        source_names=names,
        fingerprints={n: fingerprint(datasets[n]) for n in names},
        n_samples={n: len(datasets[n]) for n in names},
        num_classes=num_classes,
        model=to_dict(model),
        router=to_dict(router),
        report=report.to_dict(),
    )
    return RouterResult(net.cpu(), manifest, report)


@torch.no_grad()
def _evaluate(
    net: Router,
    x: torch.Tensor,
    y: torch.Tensor,
    sched: DDPMScheduler,
    device: torch.device,
    priors: list[float],
    cfg: RouterConfig,
    g: torch.Generator,
) -> RouterReport:
    T = int(sched.config.num_train_timesteps)
    acc_bins: list[float] = []
    w_bins: list[list[float]] = []
    confs, corrects = [], []
    for b in range(NOISE_BINS):
        lo, hi = b * T // NOISE_BINS, (b + 1) * T // NOISE_BINS
        t = torch.randint(lo, hi, (len(x),), generator=g).to(device)
        noise = torch.randn(x.shape, generator=g).to(device)
        x_t = sched.add_noise(x.to(device), noise, t)
        # the class is hidden: the report measures what the image alone tells about its source
        w = torch.cat([net(x_t[i : i + 512], t[i : i + 512], None).softmax(-1) for i in range(0, len(x), 512)])
        pred = w.argmax(-1).cpu()
        acc_bins.append(float((pred == y).float().mean()))
        w_bins.append(w.mean(0).cpu().tolist())
        confs.append(w.max(-1).values.cpu().numpy())
        corrects.append((pred == y).numpy().astype(np.float64))
    conf, correct = np.concatenate(confs), np.concatenate(corrects)
    return RouterReport(
        source_names=list(net.source_names),
        priors=priors,
        accuracy_by_noise=acc_bins,
        mean_weights_by_noise=w_bins,
        accuracy=float(correct.mean()),
        ece=_ece(conf, correct),
        steps=0,
        final_loss=0.0,
        train_seconds=0.0,
    )
