"""The router: w_i(x_t, t, c) = P(source i | x_t, t, c), a timestep- and class-conditioned CNN.

Trained with cross-entropy on x_t = sqrt(a_t) x_0 + sqrt(1-a_t) eps, x_0 drawn uniformly from the pooled sources,
so its optimum is the mixture posterior with priors lambda_i = n_i / N (and P(i | c) proportional to n_{i,c});
CDM, Golatkar et al. 2023, eq. 4. It trains through cdm.training.TrainLoop (``RouterObjective``), so a stopped
run resumes from its checkpoint.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
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
from cdm.compartment import class_input, drop_labels
from cdm.config import ModelConfig, RouterConfig, TrainConfig, to_dict
from cdm.data import SourceData, fingerprint, to_model_tensor
from cdm.denoiser import expand_timesteps
from cdm.errors import ConfigError, IntegrityError, TrainingInterrupted
from cdm.training import TrainLoop, resolve_device

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


RouterBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (x_0, source index, class or the null class)


class PoolBatches(Iterator[RouterBatch]):
    """Minibatches drawn uniformly with replacement from the pooled sources; batch ``s`` depends only on (seed, s),
    so resuming at step s is exact."""

    def __init__(
        self, x: torch.Tensor, y: torch.Tensor, c: torch.Tensor, batch_size: int, *, seed: int, start_step: int = 0
    ) -> None:
        self.x, self.y, self.c, self.batch_size, self.seed, self.step = x, y, c, batch_size, seed, start_step

    def __next__(self) -> RouterBatch:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.step)
        idx = torch.randint(0, len(self.x), (self.batch_size,), generator=g)
        self.step += 1
        return self.x[idx], self.y[idx], self.c[idx]


class RouterObjective:
    """Cross-entropy of the source given x_t = sqrt(a_t) x_0 + sqrt(1-a_t) eps, t uniform, the class hidden with
    probability ``label_dropout`` (so P(i | x_t, t) is learnt too): the optimum is the mixture posterior."""

    def __init__(
        self, scheduler: DDPMScheduler, *, num_classes: int, label_dropout: float, device: torch.device
    ) -> None:
        self.scheduler, self.num_classes, self.label_dropout, self.device = (
            scheduler,
            num_classes,
            label_dropout,
            device,
        )

    def __call__(self, model: nn.Module, batch: RouterBatch, generator: torch.Generator) -> torch.Tensor:
        x0, y, c = (v.to(self.device) for v in batch)
        n = len(x0)
        # 1. timesteps, noise and the hidden classes from the step's generator
        t = torch.randint(0, int(self.scheduler.config.num_train_timesteps), (n,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator).to(self.device)
        if self.num_classes:
            c = drop_labels(c, self.label_dropout, self.num_classes, generator)
        # 2. forward process, then cross-entropy of the source
        t = t.to(self.device)
        x_t = self.scheduler.add_noise(x0, noise, t)
        return F.cross_entropy(model(x_t, t, c), y)


def router_spec(names: Sequence[str], model: ModelConfig, router: RouterConfig, num_classes: int) -> dict[str, Any]:
    """``Router``'s arguments for ``names`` (its logit columns), the compartments' model and the ``[router]``
    widths: JSON-safe, so a head stores it as its network."""
    return {
        "source_names": [str(n) for n in names],
        "in_channels": model.in_channels,
        "sample_size": model.sample_size,
        "channels": list(router.channels),
        "num_classes": num_classes,
        "num_train_timesteps": model.num_train_timesteps,
    }


def router_train_config(router: RouterConfig) -> TrainConfig:
    """The loop settings of a router run: AdamW (torch's default weight decay), cosine decay from ``router.lr``
    without warm-up, no clipping, no EMA (the trained weights are the router)."""
    return TrainConfig(
        steps=router.steps,
        batch_size=router.batch_size,
        lr=router.lr,
        weight_decay=0.01,
        warmup_steps=0,
        lr_schedule="cosine",
        ema_decay=0.0,
        ema_warmup=False,
        grad_clip=0.0,
        label_dropout=router.label_dropout,
        seed=router.seed,
        device=router.device,
        checkpoint_every=router.checkpoint_every,
        threads=router.threads,
    )


def train_router(
    datasets: Mapping[str, SourceData],
    *,
    model: ModelConfig,
    router: RouterConfig,
    num_classes: int,
    progress: bool = True,
    should_stop: Callable[[], bool] | None = None,
    workdir: Path | None = None,
) -> RouterResult:
    """Fit w_i(x_t, t, c) by cross-entropy on noised samples of the pooled sources (order = ``datasets`` order).

    With ``workdir`` the run checkpoints to ``workdir/train_state`` every ``router.checkpoint_every`` steps and
    resumes from there when rerun on the same data and config. Raises TrainingInterrupted when ``should_stop``
    stops it (after saving a checkpoint when there is a ``workdir``).
    """
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
    net = Router(**router_spec(names, model, router, num_classes))
    sched = DDPMScheduler(**model.scheduler_config())
    fingerprints = {n: fingerprint(datasets[n]) for n in names}
    # 2. cross-entropy on noised samples drawn uniformly from the pool (this is what absorbs the priors), through the
    # one training loop: schedule, checkpoints, resume and stop handling as for compartments
    loop = TrainLoop(
        net,
        train=router_train_config(router),
        objective=RouterObjective(sched, num_classes=num_classes, label_dropout=router.label_dropout, device=device),
        resume_key={"sources": fingerprints, "router": to_dict(router), "model": to_dict(model)},
        workdir=workdir,
        progress=progress,
        should_stop=should_stop,
        desc="router",
    )
    if len(names) > 1:
        start = loop.try_resume()
        if loop.run_loop(PoolBatches(x_all, y_all, c_all, router.batch_size, seed=router.seed, start_step=start)):
            raise TrainingInterrupted(f"router training was stopped at step {loop.step} of {router.steps}")
    net.eval().requires_grad_(False)
    # 3. held-out report: accuracy per noise bin, mean weights per bin, ECE
    report = _evaluate(net, torch.cat(ev_x), torch.cat(ev_y), sched, device, priors, router, g)
    report = dataclasses.replace(
        report,
        steps=loop.step,
        final_loss=loop.recent_loss() if loop.losses else 0.0,
        train_seconds=time.perf_counter() - started,
    )
    manifest = RouterManifest(
        source_names=names,
        fingerprints=fingerprints,
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
