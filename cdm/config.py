"""Typed, frozen, range-checked configuration sections of the library (pydantic v2, ``common.settings``).

Config is loaded once (``tomllib``, then the environment, then CLI flags: ``daemon.config.load_config``) and
passed explicitly. Every section refuses unknown keys by name, wrong types and values out of range with a
``ConfigError`` naming the key (``train.steps = -5 must be >= 1``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, model_validator

from cdm.errors import ConfigError
from common.settings import AsTuple, build, replace, section, to_dict

__all__ = [
    "Device",
    "EvalConfig",
    "LibraryConfig",
    "ModelConfig",
    "RouterConfig",
    "RoutingKind",
    "SampleConfig",
    "TrainConfig",
    "build",
    "parse_library",
    "replace",
    "to_dict",
]

Device = Literal["cpu", "cuda"]
RoutingKind = Literal["learnt", "density", "heads"]  # how compartments are composed (cdm/routing/); a registry fact too
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]  # numpy's legacy seeding takes 32 bits
Threads = Annotated[int, Field(ge=0, le=1024)]  # 0 = torch's default
Steps = Annotated[int, Field(ge=1, le=10_000_000)]
BatchSize = Annotated[int, Field(ge=1, le=65_536)]
LearningRate = Annotated[float, Field(gt=0, le=1)]
Probability = Annotated[float, Field(ge=0, le=1)]


def _grayscale_or_rgb(value: int) -> int:
    if value not in (1, 3):
        raise ValueError("must be 1 (grayscale) or 3 (RGB)")
    return value


Widths = Annotated[tuple[Annotated[int, Field(ge=1, le=4096)], ...], AsTuple, Field(min_length=1, max_length=6)]


@section("model", error=ConfigError)
class ModelConfig:
    """Architecture shared by every compartment of one store (so they compose and can be vectorised)."""

    # image side in pixels; sources are resized to it (area interpolation); divisible by 2**(levels - 1)
    sample_size: Annotated[int, Field(ge=4, le=1024)] = 16
    in_channels: Annotated[int, AfterValidator(_grayscale_or_rgb)] = 1  # 1 for grayscale, 3 for RGB; sources must match
    num_classes: Annotated[int, Field(ge=0, le=100_000)] = 10  # class-conditional (+1 null class); 0 = unconditional
    block_out_channels: Widths = (32, 64)  # UNet widths per resolution level (1 to 6 levels)
    layers_per_block: Annotated[int, Field(ge=1, le=8)] = 1  # ResNet blocks per level
    attention: bool = False  # self-attention at the lowest resolution and in the mid block
    norm_num_groups: Annotated[int, Field(ge=1, le=1024)] = 8  # GroupNorm groups (must divide every width)
    num_train_timesteps: Annotated[int, Field(ge=2, le=100_000)] = 1000  # steps of the training noise schedule
    # diffusers beta schedule shared by the DDPM, DDIM and DPM-Solver schedulers
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "squaredcos_cap_v2"

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        bad = [w for w in self.block_out_channels if w % self.norm_num_groups]
        if bad:
            raise ValueError(
                f"model.norm_num_groups = {self.norm_num_groups} must divide every width of "
                f"model.block_out_channels = {list(self.block_out_channels)} (not {bad}); pick a common divisor"
            )
        factor = 2 ** (len(self.block_out_channels) - 1)
        if self.sample_size % factor:
            raise ValueError(
                f"model.sample_size = {self.sample_size} must be divisible by {factor} "
                f"(the UNet halves it {len(self.block_out_channels) - 1} time(s) for "
                f"{len(self.block_out_channels)} levels of model.block_out_channels)"
            )
        return self

    def scheduler_config(self) -> dict[str, Any]:
        """The diffusers scheduler config every compartment and the router share."""
        return {
            "num_train_timesteps": self.num_train_timesteps,
            "beta_schedule": self.beta_schedule,
            "prediction_type": "epsilon",
            "clip_sample": False,
        }


@section("train", error=ConfigError)
class TrainConfig:
    """How one compartment is trained (the AdamW + EMA recipe of improved-diffusion, scaled down)."""

    steps: Steps = 800  # optimizer steps (fixed budget)
    batch_size: BatchSize = 128  # samples per step
    lr: LearningRate = 2e-3  # peak learning rate, in (0, 1]
    weight_decay: Annotated[float, Field(ge=0, le=1)] = 0.0  # AdamW weight decay
    warmup_steps: Annotated[int, Field(ge=0, le=10_000_000)] = 50  # linear warm-up steps
    lr_schedule: Literal["cosine", "constant"] = "cosine"  # decay after warm-up
    ema_decay: Annotated[float, Field(ge=0, lt=1)] = 0.995  # EMA decay of the sampling weights, in [0, 1)
    ema_warmup: bool = True  # use min(decay, (1+step)/(10+step)) early on
    grad_clip: Annotated[float, Field(ge=0, le=1e6)] = 1.0  # max global grad norm (0 = no clipping)
    label_dropout: Probability = 0.1  # probability of training a sample with the null class
    seed: Seed = 0  # makes training deterministic
    device: Device = "cpu"  # "cuda" selects the GPU path
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16 autocast (only used on cuda)
    checkpoint_every: Annotated[int, Field(ge=0, le=10_000_000)] = 200  # steps between checkpoints (0 = none)
    threads: Threads = 0  # torch intra-op threads on CPU (0 = torch default)
    # SISA slices (Bourtoule et al. 2021): the data is split into this many fixed slices by sample id; slice j
    # trains on slices 1..j for steps / slices steps and is checkpointed, so forgetting a sample retrains only from
    # the checkpoint before its slice. 1 = one slice, no checkpoints kept (a forget retrains the compartment whole)
    slices: Annotated[int, Field(ge=1, le=1024)] = 1

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.slices > self.steps:
            raise ValueError(
                f"train.slices = {self.slices} must be <= train.steps = {self.steps} (every slice trains for at "
                "least one step); lower train.slices or raise train.steps"
            )
        return self


@section("router", error=ConfigError)
class RouterConfig:
    """The source classifier w_i(x_t, t, c) = P(source i | x_t, t, c), or the per-source heads that make it."""

    # "learnt": the CNN below, trained on every source's noised data (retrained on every add/forget);
    # "density": training-free SuperDiff weights from each compartment's own scores (the fields below are unused);
    # "heads": one CNN of this shape per compartment, trained on its source's data alone against N(0, I) with the
    # fields below (steps, batch_size = positives + negatives, lr, channels, label_dropout, seed, device,
    # eval_samples, threads, checkpoint_every), stored and forgotten with its compartment (cdm/routing/heads.py)
    kind: RoutingKind = "learnt"
    steps: Steps = 400  # optimizer steps
    batch_size: BatchSize = 256  # noised samples per step
    lr: LearningRate = 2e-3  # AdamW learning rate
    channels: Widths = (32, 64)  # CNN widths
    label_dropout: Probability = 0.5  # probability of hiding the class (so P(i | x_t, t) is learnt too)
    seed: Seed = 0
    device: Device = "cpu"
    eval_samples: Annotated[int, Field(ge=1, le=1_000_000)] = 512  # held-out noised samples per noise level
    threads: Threads = 0
    checkpoint_every: Annotated[int, Field(ge=0, le=10_000_000)] = 100  # steps between checkpoints (0 = none)


@section("sample", error=ConfigError)
class SampleConfig:
    """Defaults for sampling."""

    # diffusers scheduler; "sde-dpm" (SDE-DPM-Solver++) is stochastic, as the density kind's Itô estimator needs
    scheduler: Literal["ddim", "ddpm", "dpm", "sde-dpm"] = "dpm"
    num_inference_steps: Annotated[int, Field(ge=1, le=10_000)] = 20  # denoising steps (<= model steps)
    mode: Literal["full", "top_k"] = "full"  # composition mode
    top_k: Annotated[int, Field(ge=1, le=10_000)] = 1  # k for mode = "top_k"
    # classifier-free guidance s for labelled requests (cdm/guidance.py; 1 = none). 3 is measured: bench/RESULTS.md
    # 8.3 (learnt top-1, s = 1 / 2 / 3 / 5: FID 452 / 446 / 446 / 467, class accuracy 0.12 / 0.17 / 0.21 / 0.24);
    # an earlier run had s = 3 and 5 tied (FID 400 / 399), so 3 is the choice both runs support
    guidance_scale: Annotated[float, Field(ge=0, le=100)] = 3.0
    vectorize: Literal["auto", "loop", "vmap"] = "auto"  # compartment evaluation strategy ("auto": fastest per device)
    batch_size: BatchSize = 256  # images per forward pass
    device: Device = "cpu"
    # torch intra-op threads of a sampling process (`cdm serve`, `cdm sample`) on CPU (0 = torch default). Set it
    # to the cores the process may use: several processes each on torch's default oversubscribe the cores, and
    # measured here that made every model step 10-50x slower (bench/RESULTS.md, section 7)
    threads: Threads = 0


@section("eval", error=ConfigError)
class EvalConfig:
    """Evaluation (FID/KID on features of a classifier trained here)."""

    cache_dir: Annotated[str, Field(min_length=1)] = ".cache/cdm"  # where the feature extractor is cached
    num_samples: Annotated[int, Field(ge=2, le=1_000_000)] = 1000  # generated images per FID/KID
    # nearest / second-nearest training-image distance ratio below which a sample counts as memorised, in (0, 1]
    memorisation_ratio: Annotated[float, Field(gt=0, le=1)] = 0.333


@section("library", error=ConfigError)
class LibraryConfig:
    """The library's sections of ``config.toml``."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    router: RouterConfig = Field(default_factory=RouterConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _check(self) -> LibraryConfig:
        if self.sample.num_inference_steps > self.model.num_train_timesteps:
            raise ValueError(
                f"sample.num_inference_steps = {self.sample.num_inference_steps} must be <= "
                f"model.num_train_timesteps = {self.model.num_train_timesteps} (a scheduler cannot take more steps)"
            )
        return self


LIBRARY_SECTIONS: Mapping[str, Any] = {
    "model": ModelConfig,
    "train": TrainConfig,
    "router": RouterConfig,
    "sample": SampleConfig,
    "eval": EvalConfig,
}


def parse_library(doc: Mapping[str, Any], *, origins: Mapping[str, Mapping[str, str]] | None = None) -> LibraryConfig:
    """The library sections of a parsed TOML document (other sections are the caller's)."""
    where = origins or {}
    built = {name: build(cls, doc.get(name), origins=where.get(name)) for name, cls in LIBRARY_SECTIONS.items()}
    return LibraryConfig(**built)
