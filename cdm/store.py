"""LocalStore: the offline artifact store (a directory), the embedded default with no services.

Layout (docs/architecture.md): store.json, compartments/<source>/, router/, data/<source>.npz, work/<source>/
(resume checkpoints), receipts/ (forgetting receipts).
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cdm.artifacts import read_json, remove_tree, write_json
from cdm.compartment import Compartment, CompartmentManifest
from cdm.compose import ComposedDenoiser, Mode, Vectorize
from cdm.config import ModelConfig, RouterConfig, TrainConfig, build, to_dict
from cdm.data import SourceData, fingerprint, load_npz, save_npz
from cdm.errors import ConfigError, DataError, StoreError
from cdm.pipeline import CompartmentalPipeline, make_scheduler
from cdm.routing import Router, RouterManifest, RouterResult, load_router, save_router, train_router
from cdm.training import TrainResult, clear_train_state, train_compartment

SOURCE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_source_name(name: str) -> str:
    if not SOURCE_NAME.match(name):
        raise ConfigError(
            f"invalid source name {name!r}: use 1-64 characters from letters, digits, '.', '_' and '-', "
            "starting with a letter or digit"
        )
    return name


@dataclass(frozen=True)
class ForgetReceipt:
    """Proof of what a forgetting request deleted and what it left untouched."""

    kind: str  # "source" or "samples"
    source: str
    fingerprint: str  # data fingerprint that was forgotten (before)
    n_samples_removed: int
    deleted_files: list[str]
    untouched: dict[str, str]  # other compartments -> sha256 of their weights (unchanged)
    router_sha256_before: str | None
    router_sha256_after: str | None
    new_fingerprint: str | None = None  # for "samples": the retrained compartment's data
    seconds: float = 0.0
    created_at: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class LocalStore:
    """A directory holding compartments, the router and staged source data."""

    def __init__(self, root: Path | str, *, model: ModelConfig | None = None) -> None:
        self.root = Path(root)
        meta = self.root / "store.json"
        if meta.exists():
            doc = read_json(meta)
            stored = build(ModelConfig, doc["model"])
            if model is not None and model != stored:
                raise StoreError(
                    f"{self.root} was created with [model] {to_dict(stored)}, not {to_dict(model)}; compartments "
                    "of one store must share an architecture. Use another --store or the original config."
                )
            self.model = stored
        else:
            self.model = model or ModelConfig()
            write_json(meta, {"format": 1, "model": to_dict(self.model)})

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    # -- paths ----------------------------------------------------------------------------------
    def compartment_dir(self, name: str) -> Path:
        return self.root / "compartments" / check_source_name(name)

    def data_path(self, name: str) -> Path:
        return self.root / "data" / f"{check_source_name(name)}.npz"

    def work_dir(self, name: str) -> Path:
        return self.root / "work" / check_source_name(name)

    @property
    def router_dir(self) -> Path:
        return self.root / "router"

    # -- queries ---------------------------------------------------------------------------------
    def sources(self) -> list[str]:
        """Sources with a trained compartment, sorted by name."""
        d = self.root / "compartments"
        return sorted(p.name for p in d.iterdir() if (p / "manifest.json").exists()) if d.exists() else []

    def staged(self) -> list[str]:
        d = self.root / "data"
        return sorted(p.stem for p in d.glob("*.npz")) if d.exists() else []

    def manifest(self, name: str) -> CompartmentManifest:
        return CompartmentManifest.from_dict(read_json(self.compartment_dir(name) / "manifest.json"))

    def router_manifest(self) -> RouterManifest | None:
        p = self.router_dir / "manifest.json"
        return RouterManifest(**read_json(p)) if p.exists() else None

    # -- data ------------------------------------------------------------------------------------
    def stage_data(self, name: str, data: SourceData) -> Path:
        """Keep a copy of the source's data (the router is retrained from it; forgetting deletes it)."""
        if data.labels is not None and self.num_classes and int(data.labels.max()) >= self.num_classes:
            raise DataError(
                f"source {name!r} has label {int(data.labels.max())} but the store has num_classes = "
                f"{self.num_classes}; labels must be in [0, {self.num_classes})"
            )
        if data.images.shape[-1] != self.model.in_channels:
            raise DataError(
                f"source {name!r} has {data.images.shape[-1]} channel(s); this store expects "
                f"{self.model.in_channels} ([model] in_channels)"
            )
        path = self.data_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_npz(path, data)
        return path

    def load_data(self, name: str) -> SourceData:
        path = self.data_path(name)
        if not path.exists():
            raise StoreError(f"no staged data for source {name!r} in {self.root}; stage it with `cdm train --source`")
        return load_npz(path)

    # -- training --------------------------------------------------------------------------------
    def is_trained(self, name: str, fp: str) -> bool:
        """True if the compartment for ``name`` exists and was trained on data with fingerprint ``fp``."""
        return name in self.sources() and self.manifest(name).fingerprint == fp

    def train_compartment(
        self,
        name: str,
        train: TrainConfig,
        *,
        progress: bool = True,
        should_stop: Callable[[], bool] | None = None,
        on_step: Callable[[int, float], None] | None = None,
    ) -> TrainResult:
        """Train (or resume) the compartment of a staged source and save it durably."""
        data = self.load_data(name)
        result = train_compartment(
            name,
            data,
            model=self.model,
            train=train,
            num_classes=self.num_classes,
            workdir=self.work_dir(name),
            progress=progress,
            should_stop=should_stop,
            on_step=on_step,
        )
        if result.compartment is not None:
            result.compartment.save(self.compartment_dir(name))
            clear_train_state(self.work_dir(name))
            remove_tree(self.work_dir(name))
        return result

    def train_router(
        self, cfg: RouterConfig, *, progress: bool = True, should_stop: Callable[[], bool] | None = None
    ) -> RouterResult | None:
        """Retrain the router over every trained source (None and no router when the store is empty)."""
        names = self.sources()
        if not names:
            remove_tree(self.router_dir)
            return None
        datasets = {n: self.load_data(n) for n in names}
        result = train_router(
            datasets,
            model=self.model,
            router=cfg,
            num_classes=self.num_classes,
            progress=progress,
            should_stop=should_stop,
        )
        manifest = save_router(result.router, result.manifest, self.router_dir)
        # record lambda_i = n_i / N in each compartment's manifest (metadata only: weights are untouched)
        for name, prior in zip(names, result.report.priors, strict=True):
            m = dataclasses.replace(self.manifest(name), prior=prior)
            write_json(self.compartment_dir(name) / "manifest.json", m.to_dict())
        return dataclasses.replace(result, manifest=manifest)

    # -- loading and sampling ------------------------------------------------------------------------
    def load_compartment(self, name: str, *, device: str | torch.device = "cpu") -> Compartment:
        return Compartment.load(self.compartment_dir(name), device=device)

    def load_router(self, *, device: str | torch.device = "cpu") -> Router:
        if not (self.router_dir / "manifest.json").exists():
            raise StoreError(f"{self.root} has no router; run `cdm train --store {self.root}` first")
        router, manifest = load_router(self.router_dir, device=device)
        stale = sorted(set(manifest.source_names) ^ set(self.sources()))
        if stale:
            raise StoreError(
                f"the router in {self.root} was trained on {manifest.source_names} but the store holds "
                f"{self.sources()}; retrain it with `cdm train --store {self.root}`"
            )
        return router

    def composed(
        self,
        *,
        device: str | torch.device = "cpu",
        mode: Mode = "full",
        top_k: int = 1,
        subset: Sequence[str] | None = None,
        vectorize: Vectorize = "auto",
    ) -> ComposedDenoiser:
        names = self.sources()
        if not names:
            raise StoreError(f"{self.root} holds no compartments; train some with `cdm train`")
        router = self.load_router(device=device)
        comps = [self.load_compartment(n, device=device) for n in names]
        return ComposedDenoiser(comps, router, names, mode=mode, top_k=top_k, subset=subset, vectorize=vectorize)

    def pipeline(
        self, *, device: str | torch.device = "cpu", scheduler: str = "dpm", vectorize: Vectorize = "auto"
    ) -> CompartmentalPipeline:
        return CompartmentalPipeline(
            self.composed(device=device, vectorize=vectorize), make_scheduler(scheduler, self.model)
        )

    # -- forgetting ------------------------------------------------------------------------------
    def _weights_sha(self, name: str) -> str:
        return self.manifest(name).sha256.get("unet/diffusion_pytorch_model.safetensors", "")

    def _router_sha(self) -> str | None:
        m = self.router_manifest()
        return m.sha256.get("diffusion_pytorch_model.safetensors") if m else None

    def forget_source(self, name: str, router: RouterConfig, *, progress: bool = True) -> ForgetReceipt:
        """Exact forgetting of a whole source: drop its compartment, data and checkpoints; retrain the router."""
        started = time.perf_counter()
        if name not in self.sources() and name not in self.staged():
            raise StoreError(f"no source {name!r} in {self.root}; known: {self.sources()}")
        fp = self.manifest(name).fingerprint if name in self.sources() else fingerprint(self.load_data(name))
        n = self.manifest(name).n_samples if name in self.sources() else len(self.load_data(name))
        router_before = self._router_sha()
        deleted = remove_tree(self.compartment_dir(name)) + remove_tree(self.data_path(name))
        deleted += remove_tree(self.work_dir(name))
        untouched = {o: self._weights_sha(o) for o in self.sources()}
        self.train_router(router, progress=progress)
        return self._receipt(
            ForgetReceipt(
                kind="source",
                source=name,
                fingerprint=fp,
                n_samples_removed=n,
                deleted_files=deleted,
                untouched=untouched,
                router_sha256_before=router_before,
                router_sha256_after=self._router_sha(),
                seconds=time.perf_counter() - started,
            )
        )

    def forget_samples(
        self, name: str, ids: Sequence[int], train: TrainConfig, router: RouterConfig, *, progress: bool = True
    ) -> ForgetReceipt:
        """Exact forgetting of some samples: retrain only this source's compartment (from scratch) and the router."""
        started = time.perf_counter()
        data = self.load_data(name)
        drop = np.isin(data.ids, np.asarray(list(ids), dtype=np.int64))
        unknown = sorted(set(int(i) for i in ids) - set(int(i) for i in data.ids[drop]))
        if unknown:
            raise DataError(f"source {name!r} has no samples with ids {unknown[:10]}")
        if drop.all():
            return self.forget_source(name, router, progress=progress)
        fp_before = fingerprint(data)
        router_before = self._router_sha()
        kept = data.subset(~drop)
        deleted = remove_tree(self.compartment_dir(name)) + remove_tree(self.work_dir(name))
        self.stage_data(name, kept)
        untouched = {o: self._weights_sha(o) for o in self.sources()}
        self.train_compartment(name, train, progress=progress)
        self.train_router(router, progress=progress)
        return self._receipt(
            ForgetReceipt(
                kind="samples",
                source=name,
                fingerprint=fp_before,
                n_samples_removed=int(drop.sum()),
                deleted_files=deleted,
                untouched=untouched,
                router_sha256_before=router_before,
                router_sha256_after=self._router_sha(),
                new_fingerprint=fingerprint(kept),
                seconds=time.perf_counter() - started,
            )
        )

    def _receipt(self, receipt: ForgetReceipt) -> ForgetReceipt:
        write_json(
            self.root / "receipts" / f"{int(receipt.created_at * 1000)}-{receipt.source}.json", receipt.to_dict()
        )
        return receipt
