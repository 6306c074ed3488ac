"""Training loop (improved-diffusion's TrainLoop shape): run_loop -> run_step -> save, over any batch iterator.

One loop trains every model of the library: the optimizer step, the lr schedule (``lr_at``), EMA, checkpoints,
stop handling, the step callback and the progress bar live here; what a step minimises is its ``Objective``.
Compartments use ``EpsilonObjective``, the simple objective ||eps - eps_theta(sqrt(a_t) x_0 + sqrt(1-a_t) eps, t,
c)||^2 (Ho et al. 2020, eq. 14); the learnt router (cdm/routing/learnt.py) its cross-entropy.
Checkpoints (raw weights, EMA, AdamW state, step) are safetensors + JSON, so a killed run resumes exactly.

SISA slicing (Bourtoule et al. 2021, "Machine Unlearning", sec. V-A), ``[train] slices = S > 1``: every sample goes
to a fixed slice by a hash of its id (:func:`slice_of`); slice j trains on the union of slices 1..j for its share of
the steps (:func:`slice_ends`) and the state after it is checkpointed (``slices/<j>/``, all but the last). A
checkpoint records the fingerprints of the slices it saw, so training resumes from it only on data whose first j
slices are the very same samples: forgetting a sample of slice k retrains slices k..S from the checkpoint after k-1.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from diffusers import DDPMScheduler
from torch import nn
from tqdm.auto import tqdm

from cdm.artifacts import load_tensors, read_json, save_tensors, sha256_file, write_json
from cdm.compartment import Compartment, SliceRecord, build_unet, class_input, drop_labels, new_manifest
from cdm.config import ModelConfig, TrainConfig, to_dict
from cdm.data import SourceData, fingerprint, to_model_tensor
from cdm.errors import CdmError, ConfigError, StoreError

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor | None]
STATE_TENSORS = "state.safetensors"  # a checkpoint: raw + EMA weights, AdamW moments (safetensors)
STATE_JSON = "state.json"  # ... and its step, recent losses, config and the tensors' sha256 (written last: the commit)
SLICES_DIR = "slices"  # below a work dir and a compartment: slices/<j>/ holds the checkpoint after slice j


@dataclass(frozen=True)
class TrainResult:
    """Outcome of ``train_compartment``: a finished compartment, or an interrupted run saved for resume."""

    compartment: Compartment | None  # None when interrupted
    interrupted: bool
    steps: int  # optimizer steps done so far (total, across resumes)
    final_loss: float  # mean loss over the last logging window
    seconds: float  # wall time of this call
    resumed_from: int  # step the call started from (0 for a fresh run)
    base_slice: int = 0  # slice checkpoint the training started from (0: from scratch); see SlicePlan
    base_step: int = 0  # its step


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


# --------------------------------------------------------------------------------------------- SISA slices


def slice_of(ids: np.ndarray, slices: int) -> np.ndarray:
    """The 0-based slice of every sample id: splitmix64(id) mod ``slices``.

    A pure function of the id, so removing samples moves no other sample to another slice (and the slices of the
    data left after a forget are the old slices minus the forgotten samples, in the same order).
    """
    if slices < 1:
        raise ConfigError(f"slices = {slices} must be >= 1")
    with np.errstate(over="ignore"):
        z = np.asarray(ids, dtype=np.int64).astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z % np.uint64(slices)).astype(np.int64)


def slice_ends(steps: int, slices: int) -> tuple[int, ...]:
    """The step at which each slice ends: slice j (1-based) trains steps [ends[j-2], ends[j-1]), equal shares."""
    if not 1 <= slices <= steps:
        raise ConfigError(f"slices = {slices} must be in 1..steps = {steps} (every slice trains at least one step)")
    return tuple(steps * j // slices for j in range(1, slices + 1))


@dataclass(frozen=True)
class SlicePlan:
    """How one source's data is sliced for training: fixed by its sample ids and ``[train] slices``/``steps``."""

    assignment: np.ndarray  # 0-based slice of every sample, in data order
    counts: tuple[int, ...]  # samples per slice
    fingerprints: tuple[str, ...]  # cdm.data.fingerprint of each slice's samples (in data order)
    ends: tuple[int, ...]  # slice_ends(steps, slices)

    @classmethod
    def of(cls, data: SourceData, train: TrainConfig) -> SlicePlan:
        assignment = slice_of(data.ids, train.slices)
        parts = [data.subset(assignment == j) for j in range(train.slices)]
        return cls(
            assignment=assignment,
            counts=tuple(len(p) for p in parts),
            fingerprints=tuple(fingerprint(p) for p in parts),
            ends=slice_ends(train.steps, train.slices),
        )

    @property
    def slices(self) -> int:
        return len(self.ends)

    def start(self, j: int) -> int:
        """The step at which 1-based slice ``j`` starts (the step of the checkpoint after slice j - 1)."""
        return self.ends[j - 2] if j > 1 else 0

    def shared_prefix(self, records: tuple[SliceRecord, ...] | list[SliceRecord]) -> int:
        """How many leading slices hold exactly the samples of ``records`` (an earlier compartment's slices)."""
        n = 0
        for rec, fp, end in zip(records, self.fingerprints, self.ends, strict=False):
            if rec.fingerprint != fp or rec.end_step != end:
                break
            n += 1
        return n

    def expected_retrain_steps(self) -> float:
        """Steps one forget-samples request retrains on average, for one sample forgotten uniformly at random:
        sum_k (n_k / N) (steps - start_k) (Bourtoule et al. 2021, sec. VI: slice k's share of requests x its cost)."""
        total, steps = sum(self.counts), self.ends[-1]
        return sum(n * (steps - self.start(j)) for j, n in enumerate(self.counts, start=1)) / max(1, total)


def checkpoint_files(j: int) -> tuple[str, str]:
    """The paths (below a compartment or a work dir) of the checkpoint after 1-based slice ``j``."""
    return f"{SLICES_DIR}/{j}/{STATE_TENSORS}", f"{SLICES_DIR}/{j}/{STATE_JSON}"


class Objective(Protocol):
    """What one training step minimises: the loss of ``model`` on ``batch``.

    ``generator`` (CPU) is keyed by (seed, step) by the loop; every random draw of the step (noise, timesteps,
    label dropout) comes from it, so a resumed run repeats the interrupted one exactly.
    """

    def __call__(self, model: nn.Module, batch: Any, generator: torch.Generator) -> torch.Tensor: ...


class EpsilonObjective:
    """The simple objective ||eps - eps_theta(x_t, t, c)||^2 (Ho et al. 2020, eq. 14), with label dropout to the
    null class (classifier-free guidance, Ho & Salimans 2022); batches are ``(x_0, labels or None)``."""

    def __init__(
        self,
        scheduler: DDPMScheduler,
        *,
        num_classes: int,
        label_dropout: float,
        device: torch.device,
        autocast: bool = False,
    ) -> None:
        self.scheduler, self.num_classes, self.label_dropout = scheduler, num_classes, label_dropout
        self.device, self.autocast = device, autocast

    def __call__(self, model: nn.Module, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        x0, labels = batch
        x0 = x0.to(self.device, non_blocking=True)
        n = x0.shape[0]
        # 1. noise, timesteps and label dropout from the step's generator
        noise = torch.randn(x0.shape, generator=generator).to(self.device)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (n,), generator=generator).to(self.device)
        c = class_input(labels, n, self.num_classes, self.device)
        if c is not None and self.label_dropout > 0:
            c = drop_labels(c, self.label_dropout, self.num_classes, generator)
        # 2. forward process x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps (the scheduler's add_noise)
        x_t = self.scheduler.add_noise(x0, noise, t)
        # 3. the squared error of the predicted noise
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if self.autocast else contextlib.nullcontext()
        with ctx:
            pred = model(x_t, t, class_labels=c).sample
        return torch.nn.functional.mse_loss(pred.float(), noise)


def resolve_device(device: str) -> torch.device:
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError('device = "cuda" but no CUDA device is available; set device = "cpu"')
    return torch.device(device)


class TrainLoop:
    """Trains ``unet`` (any module) on the batches ``run_loop`` is given; EMA weights are what sampling uses.

    Args:
        unet: the model; moved to ``train.device`` and put in train mode.
        train: optimizer, schedule, EMA, clipping, seed and checkpoint cadence.
        scheduler: the noise schedule of the default objective.
        num_classes: classes of the default objective's model (0: unconditional).
        objective: the loss of a step (default: ``EpsilonObjective`` over ``scheduler``).
        resume_key: facts a checkpoint must share to be resumed (e.g. the data's fingerprints); saved in each.
        workdir: where ``train_state/`` (the resumable checkpoint) lives; None: no checkpoints.
        progress: show a progress bar.
        should_stop: polled before each step; True saves a checkpoint and ends ``run_loop``.
        on_step: called with (step, loss) after each step.
        desc: the progress bar's label.
    """

    def __init__(
        self,
        unet: nn.Module,
        *,
        train: TrainConfig,
        scheduler: DDPMScheduler | None = None,
        num_classes: int = 0,
        objective: Objective | None = None,
        resume_key: dict[str, Any] | None = None,
        workdir: Path | None = None,
        progress: bool = True,
        should_stop: Callable[[], bool] | None = None,
        on_step: Callable[[int, float], None] | None = None,
        desc: str = "train",
    ) -> None:
        self.cfg = train
        self.device = resolve_device(train.device)
        self.unet = unet.to(self.device).train()
        self.scheduler = scheduler
        self.num_classes = num_classes
        self.autocast = train.precision == "bf16" and self.device.type == "cuda"
        if objective is None:
            if scheduler is None:
                raise ConfigError("TrainLoop needs a scheduler for the default (epsilon) objective, or an objective")
            objective = EpsilonObjective(
                scheduler,
                num_classes=num_classes,
                label_dropout=train.label_dropout,
                device=self.device,
                autocast=self.autocast,
            )
        self.objective = objective
        self.resume_key = dict(resume_key or {})
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

    # -- checkpointing -------------------------------------------------------------------------
    @property
    def state_dir(self) -> Path | None:
        return self.workdir / "train_state" if self.workdir is not None else None

    def save(self, directory: Path | None = None, **meta: Any) -> dict[str, str]:
        """Write a checkpoint (raw + EMA weights, AdamW moments, step; safetensors + JSON) to ``directory``
        (default: the resumable ``train_state``); ``meta`` goes into the JSON. Returns {file name: sha256}."""
        d = directory if directory is not None else self.state_dir
        if d is None:
            return {}
        d.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        for i, (p, e) in enumerate(zip(self.params, self.ema, strict=True)):
            tensors[f"param.{i}"] = p
            tensors[f"ema.{i}"] = e
            st = self.opt.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq", "step"):
                if key in st:
                    tensors[f"opt.{i}.{key}"] = torch.as_tensor(st[key])
        save_tensors(d / STATE_TENSORS, tensors)
        tensors_sha = sha256_file(d / STATE_TENSORS)
        # the JSON is written last: it is the commit point of the checkpoint
        doc = {
            "step": self.step,
            "losses": self.losses[-200:],
            "train": to_dict(self.cfg),
            "sha256": tensors_sha,
            **({"resume_key": self.resume_key} if self.resume_key else {}),
        }
        write_json(d / STATE_JSON, {**doc, **meta})
        return {STATE_TENSORS: tensors_sha, STATE_JSON: sha256_file(d / STATE_JSON)}

    def load(self, directory: Path) -> dict[str, Any]:
        """Restore the checkpoint in ``directory`` (tensors verified against the JSON's sha256); returns the JSON."""
        meta = read_json(directory / STATE_JSON)
        if meta.get("train") != to_dict(self.cfg):
            raise StoreError(
                f"{directory} holds a checkpoint trained with a different [train] config; "
                "delete it to start over or restore the original config to resume"
            )
        if meta.get("resume_key", {}) != self.resume_key:
            raise StoreError(
                f"{directory} holds a checkpoint of another run ({meta.get('resume_key')}, this run is "
                f"{self.resume_key}); delete it to start over"
            )
        tensors = load_tensors(directory / STATE_TENSORS, expected_sha256=meta.get("sha256"))
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
        return dict(meta)

    def try_resume(self) -> int:
        """Restore the last checkpoint if one exists; returns the step to continue from."""
        if self.state_dir is None or not (self.state_dir / STATE_JSON).exists():
            return 0
        return int(self.load(self.state_dir)["step"])

    # -- the loop ------------------------------------------------------------------------------
    def run_step(self, batch: Any) -> float:
        """One optimizer step of ``objective`` on ``batch``, with the EMA update."""
        cfg = self.cfg
        # 1. the step's random draws come from a generator keyed by (seed, step): exact resume
        g = torch.Generator(device="cpu").manual_seed(cfg.seed * 7_919 + self.step)
        loss = self.objective(self.unet, batch, g)
        # 2. schedule, backward, clip, step
        for group in self.opt.param_groups:
            group["lr"] = lr_at(self.step, cfg)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip, foreach=True)
        self.opt.step()
        # 3. EMA of the weights (with the usual warm-up of the decay)
        decay = min(cfg.ema_decay, (1 + self.step) / (10 + self.step)) if cfg.ema_warmup else cfg.ema_decay
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, [p.detach() for p in self.params], 1.0 - decay)
        self.step += 1
        return float(loss.detach())

    def run_loop(self, data: Iterator[Any], until: int | None = None) -> bool:
        """Train on batches of ``data`` until step ``until`` (default: the step budget); returns True if
        ``should_stop`` interrupted it (checkpoint saved)."""
        until = self.cfg.steps if until is None else until
        bar = tqdm(
            total=until,
            initial=self.step,
            desc=self.desc,
            disable=not self.progress,
            dynamic_ncols=True,
            leave=False,
        )
        try:
            while self.step < until:
                if self.should_stop():
                    self.save()
                    return True
                loss = self.run_step(next(data))
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
    """Train (or resume) one compartment on one source; deterministic given ``train.seed`` and ``train.slices``.

    With ``workdir`` a run resumes from ``workdir/train_state`` (an interrupted run) or, with ``train.slices > 1``,
    from the latest usable slice checkpoint in ``workdir/slices/<j>/`` (this data's own, or one of an earlier
    compartment of the source whose first j slices hold exactly these samples), whichever is later; the slice
    checkpoints of this run are left there (``checkpoint_files``) and listed with their sha256 in the manifest.
    """
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
        train=train,
        scheduler=scheduler,
        num_classes=num_classes,
        workdir=workdir,
        progress=progress,
        should_stop=should_stop,
        on_step=on_step,
        desc=f"compartment {name}",
    )
    records: tuple[SliceRecord, ...] = ()
    if train.slices == 1:
        start = loop.try_resume()
        base_slice, base_step = 0, 0
        interrupted = loop.run_loop(ResumableBatches(x, labels, train.batch_size, seed=train.seed, start_step=start))
    else:
        plan = SlicePlan.of(data, train)
        start, base_slice = _resume_sliced(loop, plan, model, workdir)
        base_step = plan.start(base_slice + 1)
        interrupted = _run_sliced(loop, plan, x, labels, model, workdir)
        if not interrupted:
            records = _slice_records(loop, plan, model, workdir)
    seconds = time.perf_counter() - started
    if interrupted:
        return TrainResult(None, True, loop.step, loop.recent_loss(), seconds, start, base_slice, base_step)
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
    manifest = dataclasses.replace(
        manifest,
        steps=loop.step,
        final_loss=loop.recent_loss(),
        train_seconds=seconds,
        slices=records,
        base_slice=base_slice,
        base_step=base_step,
    )
    compartment = Compartment(unet.cpu(), manifest)
    return TrainResult(compartment, False, loop.step, loop.recent_loss(), seconds, start, base_slice, base_step)


def slice_seed(seed: int, j: int) -> int:
    """The minibatch seed of 1-based slice ``j`` (each slice draws its own epochs over the union it trains on)."""
    return seed + 1_000_003 * j


def _usable_checkpoint(workdir: Path, j: int, plan: SlicePlan, cfg: TrainConfig, model: ModelConfig) -> bool:
    """True when ``workdir/slices/<j>`` is the checkpoint after slice j of this data under this config, complete
    (its tensors match the sha256 its JSON recorded)."""
    tensors, path = (workdir / rel for rel in checkpoint_files(j))
    if not path.is_file():
        return False
    try:
        meta = read_json(path)
    except StoreError as exc:
        log.warning("ignoring the slice checkpoint %s: %s", path, exc)
        return False
    return bool(
        isinstance(meta, dict)
        and meta.get("train") == to_dict(cfg)
        and meta.get("model") == to_dict(model)
        and meta.get("slice") == j
        and meta.get("slices") == plan.slices
        and meta.get("step") == plan.ends[j - 1]
        and meta.get("fingerprints") == list(plan.fingerprints[:j])
        and tensors.is_file()
        and sha256_file(tensors) == meta.get("sha256")
    )


def _resume_sliced(loop: TrainLoop, plan: SlicePlan, model: ModelConfig, workdir: Path | None) -> tuple[int, int]:
    """Restore the later of the interrupted run's checkpoint and the last usable slice checkpoint.

    Returns (step the call starts from, slice checkpoint the training started from). The latter is recorded in
    ``workdir/origin.json`` by the first attempt, so a rerun after an interruption reports the same origin.
    """
    start = loop.try_resume()
    if workdir is None:
        return start, 0
    loaded = 0
    for j in range(plan.slices - 1, 0, -1):
        if plan.ends[j - 1] <= start:
            break
        if _usable_checkpoint(workdir, j, plan, loop.cfg, model):
            try:
                loop.load(workdir / SLICES_DIR / str(j))
            except CdmError as exc:  # IntegrityError: the tensors are not the ones the JSON recorded
                log.warning("not resuming from slice checkpoint %d in %s: %s", j, workdir, exc)
                continue
            start, loaded = plan.ends[j - 1], j
            break
    origin_path = workdir / "origin.json"
    origin = read_json(origin_path) if origin_path.is_file() else None
    if not (isinstance(origin, dict) and origin.get("train") == to_dict(loop.cfg) and "slice" in origin):
        origin = {"slice": loaded, "train": to_dict(loop.cfg)}
        write_json(origin_path, origin)
    return start, int(origin["slice"])


def _run_sliced(
    loop: TrainLoop,
    plan: SlicePlan,
    x: torch.Tensor,
    labels: torch.Tensor | None,
    model: ModelConfig,
    workdir: Path | None,
) -> bool:
    """SISA incremental training from ``loop.step``; returns True when interrupted (``loop.run_loop``)."""
    cfg = loop.cfg
    for j in range(1, plan.slices + 1):
        begin, end = plan.start(j), plan.ends[j - 1]
        # 1. slice j trains on the union of slices 1..j (data order kept) for steps [begin, end)
        if loop.step < end:
            mask = torch.from_numpy(plan.assignment < j)
            if bool(mask.any()):
                batches = ResumableBatches(
                    x[mask],
                    labels[mask] if labels is not None else None,
                    cfg.batch_size,
                    seed=slice_seed(cfg.seed, j),
                    start_step=loop.step - begin,
                )
                if loop.run_loop(batches, until=end):
                    return True
            else:  # every sample of slices 1..j was forgotten: nothing to train these steps on
                log.warning("slices 1..%d of %d hold no sample; %d steps skipped", j, plan.slices, end - begin)
                loop.step = end
        # 2. the checkpoint after slice j (not after the last: that state is the compartment itself)
        due = j < plan.slices and workdir is not None and loop.step == end
        if due and workdir is not None and not _usable_checkpoint(workdir, j, plan, cfg, model):
            loop.save(
                workdir / SLICES_DIR / str(j),
                slice=j,
                slices=plan.slices,
                fingerprints=list(plan.fingerprints[:j]),
                model=to_dict(model),
            )
    return False


def _slice_records(
    loop: TrainLoop, plan: SlicePlan, model: ModelConfig, workdir: Path | None
) -> tuple[SliceRecord, ...]:
    """The manifest's record of every slice, with the sha256 of each usable checkpoint kept in ``workdir``."""
    out = []
    for j in range(1, plan.slices + 1):
        files: dict[str, str] = {}
        if j < plan.slices and workdir is not None and _usable_checkpoint(workdir, j, plan, loop.cfg, model):
            files = {rel: sha256_file(workdir / rel) for rel in checkpoint_files(j)}
        out.append(SliceRecord(j, plan.counts[j - 1], plan.fingerprints[j - 1], plan.ends[j - 1], files))
    return tuple(out)
