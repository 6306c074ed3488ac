"""Benchmark plumbing: profiles, environment capture, result files, shared helpers (sampling + FID)."""

from __future__ import annotations

import functools
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cdm.config import Device

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Profile:
    """Sizes of one benchmark run (the same code runs every profile)."""

    name: str
    device: Device = "cpu"
    sample_size: int = 16  # Fashion-MNIST is downsampled to this side
    channels: tuple[int, ...] = (32, 64)  # UNet widths (~0.65M parameters at (32, 64))
    batch: int = 32  # monolith batch B; each of K compartments gets B / K under equal compute
    steps: int = 500  # monolith optimizer steps (and every compartment's, under equal compute)
    converged_steps: int = 500  # steps of each compartment at batch B (the paper's K x compute setting)
    converged_splits: tuple[str, ...] = ("random", "by-class")  # splits trained in the converged budget
    k: int = 8  # sources
    router_steps: int = 300
    router_batch: int = 256
    n_fid: int = 400  # generated images per FID/KID (the same for every method)
    sample_steps: int = 20  # DPM-Solver++ steps
    train_limit: int | None = None  # use only the first N training images (None: all 60k)
    memo_n: int = 16  # training images in the small-data memorisation regime (visible at 16 x 1,000+ steps)
    memo_steps: int = 1000
    sampling_batch: int = 64  # images per timed sampling call
    sampling_ks: tuple[int, ...] = (1, 2, 4, 8)
    service_steps: int = 100  # compartment steps in the service benchmark
    serving_requests: int = 96  # requests of the HTTP serving benchmark's fixed set (16 clients share them)
    serving_steps: int = 20  # DDIM steps per serving request
    serving_train_steps: int = 300  # steps of each tiny 8x8 compartment of the serving benchmark
    sisa_slices: tuple[int, ...] = (4, 8)  # [train] slices compared with 1 in the slicing benchmark
    sisa_eval_n: int = 2000  # held-out test images of its denoising loss
    # recipes group (section 2d): compartment batch sizes compared at equal FLOPs (steps = batch x steps / (K b))
    forget_recipes: tuple[int, ...] = (4, 8, 16)
    recipe_slices: int = 8  # SISA slices of every recipe (capped at its steps)
    seed: int = 0
    # routing group (bench/routing.py): every router kind samples with this one sampler, stochastic because the
    # density kind's Itô estimator needs one
    routing_scheduler: str = "sde-dpm"
    guidance_scales: tuple[float, ...] = (1.0, 1.5, 2.0, 3.0, 5.0)  # learnt kind (top-1: 2 compartment rows / step)
    # density kind (2K rows per guided step); empty: only at the scale the learnt sweep chose
    density_guidance_scales: tuple[float, ...] = (1.0, 3.0)
    n_guidance: int | None = None  # class-balanced samples per guidance row (None: n_fid)
    prune: tuple[tuple[float, int], ...] = ((1e-3, 5), (2e-2, 2))  # density pruning measured: (threshold, patience)
    forget_fraction: float = 0.01  # share of one source forgotten by the forget-samples requests
    threads: int = 0  # torch intra-op threads (0: torch's default; 1 avoids oversubscribing a shared CPU)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PROFILES = {
    "quick": Profile(
        name="quick",
        steps=60,
        converged_steps=60,
        router_steps=40,
        n_fid=100,
        sample_steps=8,
        train_limit=8000,
        memo_n=16,
        memo_steps=60,
        sampling_batch=16,
        sampling_ks=(1, 2, 4),
        service_steps=20,
        serving_requests=64,
        serving_train_steps=150,
        k=4,
        sisa_eval_n=500,
        forget_recipes=(8, 16),
        recipe_slices=4,
        guidance_scales=(1.0, 2.0, 3.0),
        density_guidance_scales=(),
        n_guidance=40,
        prune=((1e-2, 3),),
    ),
    "full": Profile(name="full"),
    # the routing group at a size that fits ~25 min on 2 loaded CPU cores (python -m bench.run --only routing)
    "routing": Profile(
        name="routing",
        steps=160,
        converged_steps=160,
        router_steps=80,
        n_fid=150,  # > the 128 feature dims, so the FID covariances have full rank
        sample_steps=20,
        sampling_batch=8,
        n_guidance=130,
        density_guidance_scales=(),
        prune=((1e-2, 3),),
        threads=1,
    ),
    # the same code on a GPU: bigger batch, longer training, more FID samples
    "gpu": Profile(
        name="gpu",
        device="cuda",
        batch=256,
        steps=4000,
        converged_steps=4000,
        n_fid=5000,
        router_steps=2000,
        # routing group: every kind at the same 5,000 samples; density's K passes per step are affordable here, so
        # it gets the whole guidance sweep too, and a larger cost batch
        density_guidance_scales=(1.0, 1.5, 2.0, 3.0, 5.0),
        n_guidance=2000,
        sampling_batch=256,
    ),
}


def environment() -> dict[str, Any]:
    """What produced the numbers: command, commit, versions, device."""
    import diffusers

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        commit = "unknown"
    return {
        "command": " ".join([Path(sys.executable).name, "-m", "bench.run", *sys.argv[1:]]),
        "git_commit": commit,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "numpy": np.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


@dataclass
class Result:
    """One benchmark's output: rows of a table plus free-form facts; written as JSON and Markdown."""

    name: str
    title: str
    profile: Profile
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)
    seconds: float = 0.0
    level: int = 3  # Markdown heading level of the title (4: a subsection, e.g. 8.5 under section 8)

    def add(self, *row: Any) -> None:
        self.rows.append(list(row))
        print("  " + " | ".join(_fmt(v) for v in row), flush=True)

    def markdown(self) -> str:
        lines = [f"{'#' * self.level} {self.title}", ""]
        if self.rows:
            lines += ["| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
            lines += ["| " + " | ".join(_fmt(v) for v in r) + " |" for r in self.rows]
            lines.append("")
        for k, v in self.facts.items():
            lines.append(f"- **{k}**: {_fmt(v)}")
        for n in self.notes:
            lines.append(f"- {n}")
        for p in self.plots:
            lines.append(f"\n![{Path(p).stem}](results/{Path(p).name})")
        lines.append(f"\n_{self.seconds:.0f} s of wall time in this run._\n")
        return "\n".join(lines)

    def write(self, out: Path, env: dict[str, Any]) -> None:
        out.mkdir(parents=True, exist_ok=True)
        doc = {
            "name": self.name,
            "title": self.title,
            "profile": self.profile.to_dict(),
            "environment": env,
            "columns": self.columns,
            "rows": self.rows,
            "facts": self.facts,
            "notes": self.notes,
            "plots": self.plots,
            "seconds": self.seconds,
        }
        (out / f"{self.name}.json").write_text(json.dumps(doc, indent=2, default=str))
        (out / f"{self.name}.md").write_text(self.markdown())


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != v:
            return "n/a"
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


@contextmanager
def timer() -> Iterator[dict[str, float]]:
    box = {"s": 0.0}
    t = time.perf_counter()
    try:
        yield box
    finally:
        box["s"] = time.perf_counter() - t


def generate(
    den: Any,
    model_cfg: Any,
    n: int,
    *,
    steps: int,
    seed: int,
    batch: int = 250,
    sources: Sequence[str] | None = None,
    top_k: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """n images (uint8) and their attribution from a composed denoiser, DPM-Solver++, fixed seed."""
    from cdm.pipeline import CompartmentalPipeline, make_scheduler

    pipe = CompartmentalPipeline(den, make_scheduler("dpm", model_cfg))
    g = torch.Generator().manual_seed(seed)
    imgs, atts = [], []
    for start in range(0, n, batch):
        out = pipe(
            batch_size=min(batch, n - start),
            sources=sources,
            top_k=top_k,
            num_inference_steps=steps,
            generator=g,
            progress=False,
        )
        imgs.append(out.images)
        atts.append(out.attribution)
    return np.concatenate(imgs), np.concatenate(atts)


class UniformRouter(torch.nn.Module):
    """The naive baseline: equal weights for every compartment (no router)."""

    def __init__(self, names: Sequence[str]) -> None:
        super().__init__()
        self.source_names = list(names)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        return torch.zeros((x_t.shape[0], len(self.source_names)), device=x_t.device)


def train_step_flops(net: torch.nn.Module, *inputs: Any) -> int:
    """FLOPs of one forward + backward pass of ``net`` on ``inputs`` (torch's FlopCounterMode; optimizer excluded).

    Device-independent: the ratio of two training budgets in FLOPs is what a saturated accelerator's wall time
    approaches, while a CPU at tiny batches is dominated by per-step overhead.
    """
    from torch.utils.flop_counter import FlopCounterMode

    net = net.train()
    with FlopCounterMode(display=False) as counter:
        out = net(*inputs)
        out = out.sample if hasattr(out, "sample") else out
        out.float().square().mean().backward()
    net.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def _step_inputs(model_cfg: Any, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    s = model_cfg.sample_size
    x = torch.randn(batch, model_cfg.in_channels, s, s)
    return x, torch.randint(0, 1000, (batch,)), torch.randint(0, 11, (batch,))


@functools.cache
def unet_step_flops(model_cfg: Any, batch: int) -> int:
    from cdm.compartment import build_unet

    return train_step_flops(build_unet(model_cfg, 10), *_step_inputs(model_cfg, batch))


@functools.cache
def router_step_flops(model_cfg: Any, router_cfg: Any, batch: int, k: int) -> int:
    from cdm.routing import Router

    net = Router(
        source_names=[f"s{i}" for i in range(k)],
        in_channels=model_cfg.in_channels,
        sample_size=model_cfg.sample_size,
        channels=router_cfg.channels,
        num_classes=10,
    )
    return train_step_flops(net, *_step_inputs(model_cfg, batch))
