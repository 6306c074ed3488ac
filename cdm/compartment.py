"""A compartment: one diffusers ``UNet2DModel`` (EMA weights) trained on one source, plus its manifest.

Under the "heads" routing kind (cdm/routing/heads.py) a compartment also carries its source's router head: the files
``head.json`` (its config and report) and ``head.safetensors`` (its weights) in the same directory, hashed into the
manifest like the unet's files, so whatever uploads, verifies, caches and deletes a compartment does the same for its
head. The head is kept as data (``CompartmentHead``), not as a submodule: compartments with and without a head keep
the same module tree (``StackedDenoisers``), and the composition that evaluates heads builds their networks.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DModel
from diffusers.utils import SAFETENSORS_WEIGHTS_NAME

import cdm
from cdm.artifacts import (
    MANIFEST,
    atomic_directory,
    hash_tree,
    load_tensors,
    read_json,
    save_tensors,
    verify_tree,
    write_json,
)
from cdm.config import ModelConfig, TrainConfig, build, to_dict
from cdm.denoiser import expand_timesteps
from cdm.errors import StoreError

WEIGHTS = f"unet/{SAFETENSORS_WEIGHTS_NAME}"  # diffusers' save_pretrained layout below unet/
UNET_CONFIG = "unet/config.json"
HEAD_WEIGHTS = "head.safetensors"  # the router head of the "heads" routing kind (cdm/routing/heads.py)
HEAD_CONFIG = "head.json"  # ... its network config, training facts and report
FORMAT = 1


def has_head(files: Iterable[str]) -> bool:
    """Whether an artifact with these files (relative paths) carries a router head."""
    names = set(files)
    return HEAD_CONFIG in names and HEAD_WEIGHTS in names


@dataclass(frozen=True)
class CompartmentHead:
    """A compartment's router head as stored: its JSON document (``network``: the constructor arguments of
    ``cdm.routing.learnt.Router``; plus the data fingerprint and a report) and its weights."""

    doc: dict[str, Any]
    state: dict[str, torch.Tensor]


def build_unet(model: ModelConfig, num_classes: int) -> UNet2DModel:
    """The compartment architecture; ``num_classes > 0`` adds class embeddings plus one null class."""
    levels = len(model.block_out_channels)
    down = ["DownBlock2D"] * levels
    up = ["UpBlock2D"] * levels
    if model.attention:
        down[-1] = "AttnDownBlock2D"
        up[0] = "AttnUpBlock2D"
    return UNet2DModel(
        sample_size=model.sample_size,
        in_channels=model.in_channels,
        out_channels=model.in_channels,
        layers_per_block=model.layers_per_block,
        block_out_channels=tuple(model.block_out_channels),
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        norm_num_groups=model.norm_num_groups,
        add_attention=model.attention,  # the mid-block attention too: off keeps small CPU models fast
        num_class_embeds=(num_classes + 1) if num_classes > 0 else None,
    )


def class_input(
    class_labels: torch.Tensor | None, n: int, num_classes: int, device: torch.device
) -> torch.Tensor | None:
    """Labels as the UNet wants them: None for unconditional stores, the null index where labels are absent."""
    if num_classes == 0:
        return None
    if class_labels is None:
        return torch.full((n,), num_classes, dtype=torch.long, device=device)
    return class_labels.to(device=device, dtype=torch.long)


def drop_labels(c: torch.Tensor, p: float, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """Label dropout for classifier-free guidance: each label replaced by the null class (``num_classes``) with
    probability ``p``, from one uniform draw per row of ``generator``."""
    drop = (torch.rand(len(c), generator=generator) < p).to(c.device)
    return torch.where(drop, torch.full_like(c, num_classes), c)


@dataclass(frozen=True)
class SliceRecord:
    """One SISA slice of a compartment's data and the checkpoint kept after it (Bourtoule et al. 2021, sec. V-A)."""

    index: int  # 1-based; slice j trained on slices 1..j
    n_samples: int  # samples in this slice
    fingerprint: str  # cdm.data.fingerprint of this slice's samples, in data order
    end_step: int  # the optimizer step at which training on this slice ended
    # checkpoint after the slice: path below the compartment -> sha256 ({} for the last slice: that is the compartment)
    checkpoint: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SliceRecord:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise StoreError(f"manifest slice record has unknown fields {sorted(unknown)}; written by a newer cdm?")
        return cls(**d)


@dataclass(frozen=True)
class CompartmentManifest:
    """Everything needed to trust, reload and audit a compartment."""

    name: str  # source name
    fingerprint: str  # sha256 of the source's canonical data
    n_samples: int
    class_counts: list[int]  # per class (empty when unconditional)
    num_classes: int
    model: dict[str, Any]  # ModelConfig
    train: dict[str, Any]  # TrainConfig
    steps: int
    final_loss: float
    train_seconds: float
    sha256: dict[str, str] = field(default_factory=dict)  # relative path -> sha256
    prior: float | None = None  # lambda_i, set when the router is trained
    created_at: float = 0.0
    library_version: str = cdm.__version__
    format: int = FORMAT
    # SISA slicing ([train] slices > 1): the slices in training order, each with the checkpoint kept after it
    slices: tuple[SliceRecord, ...] = ()
    # where training started: after slice ``base_slice`` (step ``base_step``) of the checkpoints of
    # ``base_compartment`` (a forget-samples retrain reuses the checkpoints before the first changed slice); 0 = scratch
    base_slice: int = 0
    base_step: int = 0
    base_compartment: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CompartmentManifest:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise StoreError(f"manifest has unknown fields {sorted(unknown)}; written by a newer cdm?")
        doc = dict(d)
        doc["slices"] = tuple(SliceRecord.from_dict(s) for s in doc.get("slices", ()))
        return cls(**doc)

    @property
    def model_config(self) -> ModelConfig:
        return build(ModelConfig, self.model)


class Compartment(torch.nn.Module):
    """A Denoiser over one source: ``eps = unet(x_t, t, c)`` with the EMA weights."""

    def __init__(self, unet: UNet2DModel, manifest: CompartmentManifest, head: CompartmentHead | None = None) -> None:
        super().__init__()
        self.unet = unet
        self.manifest = manifest
        self.num_classes = manifest.num_classes
        self.head = head  # the "heads" routing kind's head (plain data: not a submodule)

    @property
    def name(self) -> str:
        return self.manifest.name

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        n = x_t.shape[0]
        tt = expand_timesteps(t, n, x_t.device)
        c = class_input(class_labels, n, self.num_classes, x_t.device)
        return self.unet(x_t, tt, class_labels=c).sample

    def save(self, directory: Path) -> CompartmentManifest:
        """Write unet config + safetensors + manifest (with sha256s) atomically to ``directory``."""
        with atomic_directory(Path(directory)) as tmp:
            # diffusers' own format: unet/config.json + unet/diffusion_pytorch_model.safetensors
            self.unet.save_pretrained(tmp / "unet", safe_serialization=True)
            if self.head is not None:
                save_tensors(tmp / HEAD_WEIGHTS, self.head.state)
                write_json(tmp / HEAD_CONFIG, self.head.doc)
            manifest = dataclasses.replace(
                self.manifest, sha256=hash_tree(tmp), created_at=self.manifest.created_at or time.time()
            )
            write_json(tmp / MANIFEST, manifest.to_dict())
        self.manifest = manifest
        return manifest

    @classmethod
    def load(
        cls,
        directory: Path,
        *,
        device: str | torch.device = "cpu",
        expected_sha256: Mapping[str, str] | None = None,
    ) -> Compartment:
        """Load after verifying every file's sha256 against the manifest (and ``expected_sha256`` if given)."""
        directory = Path(directory)
        manifest = CompartmentManifest.from_dict(read_json(directory / MANIFEST))
        if expected_sha256 is not None and dict(expected_sha256) != manifest.sha256:
            from cdm.errors import IntegrityError

            raise IntegrityError(
                f"{directory}: manifest sha256s differ from the ones recorded by the caller (registry); "
                "the artifact was replaced after registration"
            )
        verify_tree(directory, {k: v for k, v in manifest.sha256.items() if k not in (WEIGHTS, HEAD_WEIGHTS)})
        config = json.loads((directory / UNET_CONFIG).read_text())
        unet = UNet2DModel.from_config(config)
        state = load_tensors(directory / WEIGHTS, expected_sha256=manifest.sha256.get(WEIGHTS, ""))
        unet.load_state_dict(state)
        unet.eval().requires_grad_(False)
        head = None
        if has_head(manifest.sha256):  # head.json verified above, the weights as they are decoded
            doc = read_json(directory / HEAD_CONFIG)
            if not isinstance(doc, dict):
                raise StoreError(f"{directory / HEAD_CONFIG} is not a JSON object; the artifact is corrupt")
            head = CompartmentHead(
                doc, load_tensors(directory / HEAD_WEIGHTS, expected_sha256=manifest.sha256[HEAD_WEIGHTS])
            )
        return cls(unet, manifest, head).to(device)


def new_manifest(
    name: str,
    *,
    fingerprint: str,
    n_samples: int,
    class_counts: list[int],
    num_classes: int,
    model: ModelConfig,
    train: TrainConfig,
) -> CompartmentManifest:
    return CompartmentManifest(
        name=name,
        fingerprint=fingerprint,
        n_samples=n_samples,
        class_counts=class_counts,
        num_classes=num_classes,
        model=to_dict(model),
        train=to_dict(train),
        steps=0,
        final_loss=float("nan"),
        train_seconds=0.0,
    )
