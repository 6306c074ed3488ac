"""Training loop (improved-diffusion's TrainLoop shape): run_loop -> run_step -> save, over any batch iterator.

Loss: the simple objective ||eps - eps_theta(sqrt(a_t) x_0 + sqrt(1-a_t) eps, t, c)||^2 (Ho et al. 2020, eq. 14).
Checkpoints (raw weights, EMA, AdamW state, step) are safetensors + JSON, so a killed run resumes exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DModel
from tqdm.auto import tqdm

from cdm.artifacts import load_tensors, read_json, remove_tree, save_tensors, write_json
from cdm.compartment import Compartment, build_unet, class_input, new_manifest
from cdm.config import ModelConfig, TrainConfig, to_dict
from cdm.data import SourceData, fingerprint, to_model_tensor
from cdm.errors import ConfigError, StoreError

Batch = tuple[torch.Tensor, torch.Tensor | None]


@dataclass(frozen=True)
class TrainResult:
    """Outcome of ``train_compartment``: a finished compartment, or an interrupted run saved for resume."""

    compartment: Compartment | None  # None when interrupted
    interrupted: bool
    steps: int  # optimizer steps done so far (total, across resumes)
    final_loss: float  # mean loss over the last logging window
    seconds: float  # wall time of this call
    resumed_from: int  # step the call started from (0 for a fresh run)


class ResumableBatches(Iterator[Batch]):
    """Deterministic minibatches: batch ``s`` depends only on (seed, s), so resuming at step s is exact.

    Each epoch is a permutation seeded by (seed, epoch); batches are consecutive slices of the concatenated
    epoch permutations.
    """

    def __init__(
        self, x: torch.Tensor, labels: torch.Tensor | None, batch_size: int, *, seed: int, start_step: int = 0
    ) -> None:
        if len(x) == 0:
            raise ConfigError("cannot train on an empty source")
        self.x, self.labels, self.batch_size, self.seed = x, labels, batch_size, seed
        self.step = start_step
        self._perm_epoch = -1
        self._perm = torch.empty(0, dtype=torch.long)

    def _perm_for(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(len(self.x), generator=g)
            self._perm_epoch = epoch
        return self._perm

    def __next__(self) -> Batch:
        n, size = len(self.x), self.batch_size
        start = self.step * size
        parts: list[torch.Tensor] = []
        got = 0
        while got < size:
            epoch, offset = divmod(start + got, n)
            take = min(size - got, n - offset)
            parts.append(self._perm_for(epoch)[offset : offset + take])
            got += take
        index = torch.cat(parts) if len(parts) > 1 else parts[0]
        self.step += 1
        return self.x[index], (self.labels[index] if self.labels is not None else None)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up then cosine (or constant) decay."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def resolve_device(device: str) -> torch.device:
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError('device = "cuda" but no CUDA device is available; set device = "cpu"')
    return torch.device(device)


class TrainLoop:
    """Trains ``unet`` on batches from ``data``; EMA weights are what sampling uses."""

    def __init__(
        self,
        unet: UNet2DModel,
        data: Iterator[Batch],
        *,
        train: TrainConfig,
        scheduler: DDPMScheduler,
        num_classes: int,
        workdir: Path | None = None,
        progress: bool = True,
        should_stop: Callable[[], bool] | None = None,
        on_step: Callable[[int, float], None] | None = None,
        desc: str = "train",
    ) -> None:
        self.cfg = train
        self.device = resolve_device(train.device)
        self.unet = unet.to(self.device).train()
        self.data = data
        self.scheduler = scheduler
        self.num_classes = num_classes
        self.workdir = workdir
        self.progress = progress
        self.should_stop = should_stop or (lambda: False)
        self.on_step = on_step
        self.desc = desc
        self.params = [p for p in self.unet.parameters() if p.requires_grad]
        self.ema = [p.detach().clone() for p in self.params]
        # foreach: one kernel per op over all tensors (the per-tensor loop is the CPU default, ~7% slower here)
        self.opt = torch.optim.AdamW(self.params, lr=train.lr, weight_decay=train.weight_decay, foreach=True)
        self.step = 0
        self.losses: list[float] = []
        self.autocast = train.precision == "bf16" and self.device.type == "cuda"

    # -- checkpointing -------------------------------------------------------------------------
    @property
    def state_dir(self) -> Path | None:
        return self.workdir / "train_state" if self.workdir is not None else None

    def save(self) -> None:
        """Resumable checkpoint: raw + EMA weights, AdamW moments, step (all safetensors / JSON)."""
        if self.state_dir is None:
            return
        d = self.state_dir
        d.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        for i, (p, e) in enumerate(zip(self.params, self.ema, strict=True)):
            tensors[f"param.{i}"] = p
            tensors[f"ema.{i}"] = e
            st = self.opt.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq", "step"):
                if key in st:
                    tensors[f"opt.{i}.{key}"] = torch.as_tensor(st[key])
        save_tensors(d / "state.safetensors", tensors)
        # the JSON is written last: it is the commit point of the checkpoint
        write_json(d / "state.json", {"step": self.step, "losses": self.losses[-200:], "train": to_dict(self.cfg)})

    def try_resume(self) -> int:
        """Restore the last checkpoint if one exists; returns the step to continue from."""
        if self.state_dir is None or not (self.state_dir / "state.json").exists():
            return 0
        meta = read_json(self.state_dir / "state.json")
        if meta.get("train") != to_dict(self.cfg):
            raise StoreError(
                f"{self.state_dir} holds a checkpoint trained with a different [train] config; "
                "delete it to start over or restore the original config to resume"
            )
        tensors = load_tensors(self.state_dir / "state.safetensors")
        with torch.no_grad():
            for i, (p, e) in enumerate(zip(self.params, self.ema, strict=True)):
                p.copy_(tensors[f"param.{i}"])
                e.copy_(tensors[f"ema.{i}"])
                if f"opt.{i}.exp_avg" in tensors:
                    self.opt.state[p] = {
                        "step": tensors[f"opt.{i}.step"].clone().float(),
                        "exp_avg": tensors[f"opt.{i}.exp_avg"].to(self.device).clone(),
                        "exp_avg_sq": tensors[f"opt.{i}.exp_avg_sq"].to(self.device).clone(),
                    }
        self.step = int(meta["step"])
        self.losses = list(meta.get("losses", []))
        return self.step

    def clear_checkpoint(self) -> None:
        if self.state_dir is not None:
            remove_tree(self.state_dir)

    # -- the loop ------------------------------------------------------------------------------
    def run_step(self, x0: torch.Tensor, labels: torch.Tensor | None) -> float:
        """One optimizer step of the epsilon objective with EMA update."""
        cfg = self.cfg
        x0 = x0.to(self.device, non_blocking=True)
        n = x0.shape[0]
        # 1. noise, timesteps and label dropout from a generator keyed by (seed, step): exact resume
        g = torch.Generator(device="cpu").manual_seed(cfg.seed * 7_919 + self.step)
        noise = torch.randn(x0.shape, generator=g).to(self.device)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (n,), generator=g).to(self.device)
        c = class_input(labels, n, self.num_classes, self.device)
        if c is not None and cfg.label_dropout > 0:
            drop = (torch.rand(n, generator=g) < cfg.label_dropout).to(self.device)
            c = torch.where(drop, torch.full_like(c, self.num_classes), c)
        # 2. forward process x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps (the scheduler's add_noise)
        x_t = self.scheduler.add_noise(x0, noise, t)
        # 3. loss, backward, clip, step
        for group in self.opt.param_groups:
            group["lr"] = lr_at(self.step, cfg)
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if self.autocast else contextlib.nullcontext()
        with ctx:
            pred = self.unet(x_t, t, class_labels=c).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip, foreach=True)
        self.opt.step()
        # 4. EMA of the weights (with the usual warm-up of the decay)
        decay = min(cfg.ema_decay, (1 + self.step) / (10 + self.step)) if cfg.ema_warmup else cfg.ema_decay
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, [p.detach() for p in self.params], 1.0 - decay)
        self.step += 1
        return float(loss.detach())

    def run_loop(self) -> bool:
        """Train until the step budget; returns True if ``should_stop`` interrupted it (checkpoint saved)."""
        bar = tqdm(
            total=self.cfg.steps,
            initial=self.step,
            desc=self.desc,
            disable=not self.progress,
            dynamic_ncols=True,
            leave=False,
        )
        try:
            while self.step < self.cfg.steps:
                if self.should_stop():
                    self.save()
                    return True
                x0, labels = next(self.data)
                loss = self.run_step(x0, labels)
                self.losses.append(loss)
                if self.on_step is not None:
                    self.on_step(self.step, loss)
                bar.update(1)
                if self.step % 10 == 0:
                    bar.set_postfix(loss=f"{self.recent_loss():.4f}")
                if self.cfg.checkpoint_every > 0 and self.step % self.cfg.checkpoint_every == 0:
                    self.save()
        finally:
            bar.close()
        return False

    def recent_loss(self, window: int = 50) -> float:
        tail = self.losses[-window:]
        return float(sum(tail) / len(tail)) if tail else float("nan")

    def ema_state_dict(self) -> dict[str, torch.Tensor]:
        """The unet state dict with EMA values in place of the trainable parameters."""
        names = [name for name, p in self.unet.named_parameters() if p.requires_grad]
        state = {k: v.detach().clone() for k, v in self.unet.state_dict().items()}
        for name, e in zip(names, self.ema, strict=True):
            state[name] = e.detach().clone()
        return state


def check_trainable(name: str, data: SourceData, *, model: ModelConfig, num_classes: int) -> None:
    """Raise ConfigError when ``data`` can never train under ``model`` (checked before any training starts).

    The rule, in one place: images must have ``model.in_channels`` channels; a class-conditional model
    (``num_classes > 0``) needs labels, all below ``num_classes``.
    """
    channels = data.images.shape[-1]
    if channels != model.in_channels:
        raise ConfigError(
            f"source {name!r} has {channels} channel(s) but [model] in_channels = "
            f"{model.in_channels}; convert the images or change the model config"
        )
    if num_classes > 0 and data.labels is None:
        raise ConfigError(
            f"source {name!r} is unlabelled but the model is class-conditional ([model] num_classes = "
            f"{num_classes}); send labels or use an unconditional store (num_classes = 0)"
        )
    if num_classes > 0 and data.labels is not None and len(data.labels) and int(data.labels.max()) >= num_classes:
        raise ConfigError(
            f"source {name!r} has label {int(data.labels.max())} but [model] num_classes = {num_classes} "
            f"allows only 0..{num_classes - 1}"
        )


def train_compartment(
    name: str,
    data: SourceData,
    *,
    model: ModelConfig,
    train: TrainConfig,
    num_classes: int,
    workdir: Path | None = None,
    progress: bool = True,
    should_stop: Callable[[], bool] | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train (or resume) one compartment on one source; deterministic given ``train.seed``."""
    started = time.perf_counter()
    check_trainable(name, data, model=model, num_classes=num_classes)
    if train.threads > 0:
        torch.set_num_threads(train.threads)
    torch.manual_seed(train.seed)
    unet = build_unet(model, num_classes)
    x = to_model_tensor(data.images, model.sample_size)
    labels = torch.as_tensor(data.labels, dtype=torch.long) if (data.labels is not None and num_classes) else None
    scheduler = DDPMScheduler(**model.scheduler_config())
    loop = TrainLoop(
        unet,
        iter(()),
        train=train,
        scheduler=scheduler,
        num_classes=num_classes,
        workdir=workdir,
        progress=progress,
        should_stop=should_stop,
        on_step=on_step,
        desc=f"compartment {name}",
    )
    start = loop.try_resume()
    loop.data = ResumableBatches(x, labels, train.batch_size, seed=train.seed, start_step=start)
    interrupted = loop.run_loop()
    seconds = time.perf_counter() - started
    if interrupted:
        return TrainResult(None, True, loop.step, loop.recent_loss(), seconds, start)
    unet.load_state_dict(loop.ema_state_dict())
    unet.eval().requires_grad_(False)
    manifest = new_manifest(
        name,
        fingerprint=fingerprint(data),
        n_samples=len(data),
        class_counts=data.class_counts(num_classes) if num_classes else [],
        num_classes=num_classes,
        model=model,
        train=train,
    )
    manifest = dataclasses.replace(manifest, steps=loop.step, final_loss=loop.recent_loss(), train_seconds=seconds)
    compartment = Compartment(unet.cpu(), manifest)
    return TrainResult(compartment, False, loop.step, loop.recent_loss(), seconds, start)


def clear_train_state(workdir: Path) -> None:
    """Delete a finished run's resume checkpoint (call after the compartment is durably saved)."""
    remove_tree(workdir / "train_state")
