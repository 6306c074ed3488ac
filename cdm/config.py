"""Typed, frozen configuration sections for the library, and a strict TOML section parser.

Config is loaded once (``tomllib``) and passed explicitly; unknown keys are rejected by name.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from cdm.errors import ConfigError

T = TypeVar("T")

Device = Literal["cpu", "cuda"]
RoutingKind = Literal["learnt", "density"]  # how compartments are composed (cdm/routing/); a registry fact too


@dataclass(frozen=True)
class ModelConfig:
    """Architecture shared by every compartment of one store (so they compose and can be vectorised)."""

    sample_size: int = 16  # image side in pixels; sources are resized to it (area interpolation)
    in_channels: int = 1  # 1 for grayscale, 3 for RGB; sources must match
    num_classes: int = 10  # class-conditional with this many classes (+1 null class); 0 = unconditional
    block_out_channels: tuple[int, ...] = (32, 64)  # UNet widths per resolution level
    layers_per_block: int = 1  # ResNet blocks per level
    attention: bool = False  # self-attention at the lowest resolution and in the mid block
    norm_num_groups: int = 8  # GroupNorm groups (must divide every width)
    num_train_timesteps: int = 1000  # diffusion steps of the training noise schedule
    beta_schedule: str = "squaredcos_cap_v2"  # diffusers beta schedule name ("linear", "squaredcos_cap_v2", ...)

    def scheduler_config(self) -> dict[str, Any]:
        """The diffusers scheduler config every compartment and the router share."""
        return {
            "num_train_timesteps": self.num_train_timesteps,
            "beta_schedule": self.beta_schedule,
            "prediction_type": "epsilon",
            "clip_sample": False,
        }


@dataclass(frozen=True)
class TrainConfig:
    """How one compartment is trained (the AdamW + EMA recipe of improved-diffusion, scaled down)."""

    steps: int = 800  # optimizer steps (fixed budget)
    batch_size: int = 128  # samples per step
    lr: float = 2e-3  # peak learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_steps: int = 50  # linear warm-up steps
    lr_schedule: Literal["cosine", "constant"] = "cosine"  # decay after warm-up
    ema_decay: float = 0.995  # EMA decay of the sampling weights
    ema_warmup: bool = True  # use min(decay, (1+step)/(10+step)) early on
    grad_clip: float = 1.0  # max global grad norm
    label_dropout: float = 0.1  # probability of training a sample with the null class
    seed: int = 0  # makes training deterministic
    device: Device = "cpu"  # "cuda" selects the GPU path
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16 autocast (only used on cuda)
    checkpoint_every: int = 200  # steps between resumable checkpoints
    threads: int = 0  # torch intra-op threads on CPU (0 = torch default)


@dataclass(frozen=True)
class RouterConfig:
    """The source classifier w_i(x_t, t, c) = P(source i | x_t, t, c)."""

    # "learnt": the CNN below, trained on every source's noised data (retrained on every add/forget);
    # "density": training-free SuperDiff weights from each compartment's own scores (the fields below are unused)
    kind: RoutingKind = "learnt"
    steps: int = 400  # optimizer steps
    batch_size: int = 256  # noised samples per step
    lr: float = 2e-3  # AdamW learning rate
    channels: tuple[int, ...] = (32, 64)  # CNN widths
    label_dropout: float = 0.5  # probability of hiding the class (so P(i | x_t, t) is learnt too)
    seed: int = 0
    device: Device = "cpu"
    eval_samples: int = 512  # held-out noised samples per noise level for the report
    threads: int = 0


@dataclass(frozen=True)
class SampleConfig:
    """Defaults for sampling."""

    scheduler: Literal["ddim", "ddpm", "dpm"] = "dpm"  # diffusers scheduler
    num_inference_steps: int = 20  # denoising steps
    mode: Literal["full", "top_k"] = "full"  # composition mode
    top_k: int = 1  # k for mode = "top_k"
    vectorize: Literal["auto", "loop", "vmap"] = "auto"  # compartment evaluation strategy ("auto": fastest per device)
    batch_size: int = 256  # images per forward pass
    device: Device = "cpu"


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation (FID/KID on features of a classifier trained here)."""

    cache_dir: str = ".cache/cdm"  # where the feature extractor is cached (by content hash)
    num_samples: int = 1000  # generated images per FID/KID
    memorisation_ratio: float = 0.333  # nearest / second-nearest distance ratio counted as memorised


@dataclass(frozen=True)
class LibraryConfig:
    """The library's sections of ``config.toml``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where} = {value!r} is not allowed; choose one of {list(args)}")
        return value
    if origin in (types.UnionType, typing.Union):
        errors = []
        for arg in args:
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{where} = {value!r} matches none of {args}")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        inner = args[0]
        return tuple(_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{where} must be empty, got {value!r}")
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return parse_section(tp, value, where)
    return value


def parse_section(cls: type[T], table: Any, name: str) -> T:
    """Build dataclass ``cls`` from a TOML table; unknown keys and wrong types raise ConfigError by name."""
    if table is None:
        return cls()
    if not isinstance(table, Mapping):
        raise ConfigError(f"[{name}] must be a table, got {table!r}")
    assert dataclasses.is_dataclass(cls)
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - fields)
    if unknown:
        raise ConfigError(f"unknown key(s) in [{name}]: {', '.join(unknown)}; allowed: {', '.join(sorted(fields))}")
    kwargs = {k: _coerce(v, hints[k], f"{name}.{k}") for k, v in table.items()}
    return cls(**kwargs)


def replace(section: T, **overrides: Any) -> T:
    """``dataclasses.replace`` that ignores ``None`` overrides (CLI flags that were not given)."""
    given = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(section, **given)  # type: ignore[type-var]


def parse_library(doc: Mapping[str, Any]) -> LibraryConfig:
    """The library sections of a parsed TOML document (other sections are the caller's)."""
    return LibraryConfig(
        model=parse_section(ModelConfig, doc.get("model"), "model"),
        train=parse_section(TrainConfig, doc.get("train"), "train"),
        router=parse_section(RouterConfig, doc.get("router"), "router"),
        sample=parse_section(SampleConfig, doc.get("sample"), "sample"),
        eval=parse_section(EvalConfig, doc.get("eval"), "eval"),
    )


def to_dict(section: Any) -> dict[str, Any]:
    """JSON-able dict of a config dataclass (tuples become lists)."""
    return json_safe(dataclasses.asdict(section))


def json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj
