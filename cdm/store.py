"""LocalStore: the offline store (a directory), the embedded default with no services.

It runs the same lifecycle as the daemon (``cdm.lifecycle``) over a JSON catalogue and a local artifact store. The
routing kind is a fact of the store, as it is of the registry: recorded from ``[router] kind`` when the store first
trains, then used by every command (``composed()`` builds any kind); training or forgetting under another kind is
refused (compartments trained under one kind carry no heads, or router, for another)::

    STORE/store.json                      format and [model] of the store
    STORE/catalogue.json                  the catalogue (LocalCatalogue): compartments, router, tombstones, receipts,
                                          and the routing kind ([router] kind) the store trains under
    STORE/compartments/<source>@v<n>/     a compartment (unet/ + manifest.json; slices/<j>/ the checkpoint after SISA
                                          slice j when [train] slices > 1, hashed in the manifest)
    STORE/routers/<router id>/            the learnt router
    STORE/data/<source>/<fingerprint>.npz the kept copy of a source's data (router retraining, forget-samples)
    STORE/work/<source>-<fp16>/           resume checkpoints while training
    STORE/journal/<request id>.json       forget requests in progress (a rerun finishes them)
    STORE/receipts/<ms>-<source>.json     forgetting receipts (one per request)
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from cdm.artifacts import DirectoryStore, StoredFile, confined_path, read_json, stored_files_from_dict, write_json
from cdm.compartment import Compartment, CompartmentManifest
from cdm.compose import Composed, ComposedDenoiser, Mode, Vectorize
from cdm.config import ModelConfig, RouterConfig, RoutingKind, TrainConfig, build, to_dict
from cdm.data import SourceData, fingerprint, load_npz
from cdm.errors import ConfigError, DataError, StoreError
from cdm.lifecycle import (
    Entry,
    ForgetReceipt,
    Lifecycle,
    RouterEntry,
    RouterKind,
    Tombstone,
    compartment_prefix,
    data_key,
    router_prefix,
    source_of,
)
from cdm.pipeline import CompartmentalPipeline, make_scheduler
from cdm.routing import Router, RouterManifest, RouterResult, check_kind, compose_trained, load_router
from cdm.training import TrainResult
from common.names import SOURCE_NAME_RULE, is_source_name

FORMAT = 2  # 1: compartments/<source>/, router/, data/<source>.npz (before the shared lifecycle)

__all__ = ["FORMAT", "ForgetReceipt", "LocalCatalogue", "LocalStore", "check_source_name"]


def check_source_name(name: str) -> str:
    """``name`` if it follows the source-name rule (``common.names``); ConfigError otherwise."""
    if not is_source_name(name):
        raise ConfigError(f"invalid source name {name!r:.100}: use {SOURCE_NAME_RULE}")
    return name


# --------------------------------------------------------------------------------------------- the catalogue


def _files_doc(files: Mapping[str, StoredFile]) -> dict[str, dict[str, Any]]:
    return {rel: dataclasses.asdict(f) for rel, f in files.items()}


class LocalCatalogue:
    """A ``cdm.lifecycle.Catalogue`` kept in one JSON file (rewritten atomically on every change), with forget
    journals as files in ``journal/`` and receipts in ``receipts/`` beside it. One process at a time."""

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.root = self.path.parent
        self._clock = clock
        if self.path.exists():
            self._doc: dict[str, Any] = read_json(self.path)
        else:
            self._doc = {"format": 1, "epoch": 0, "versions": {}, "compartments": {}, "fingerprints": {}}
            self._doc.update(router=None, tombstones={}, receipts={}, staged={})
        if self._doc.get("format") != 1:
            raise StoreError(f"{self.path} has catalogue format {self._doc.get('format')!r}; this cdm reads 1")

    def _save(self) -> None:
        write_json(self.path, self._doc)

    @property
    def epoch(self) -> int:
        return int(self._doc["epoch"])

    def _entry(self, cid: str) -> Entry:
        r = self._doc["compartments"][cid]
        return Entry(
            compartment_id=cid,
            source=r["source"],
            status=r["status"],
            fingerprint=r.get("fingerprint", ""),
            n_samples=int(r.get("n_samples", 0)),
            files=stored_files_from_dict(r.get("files", {})),
            lineage=r.get("lineage", {}),
            prior=float(r.get("prior", 0.0)),
        )

    # -- the routing kind (offline only: the registry keeps it as ``ns:routing``)

    def routing(self) -> str | None:
        """The routing kind recorded for the store; None when none is (a new store, or one older than the record)."""
        kind = self._doc.get("routing")
        return str(kind) if kind is not None else None

    def set_routing(self, kind: str) -> None:
        if self._doc.get("routing") != kind:
            self._doc["routing"] = kind
            self._save()

    def trained_any(self) -> bool:
        """Whether anything was ever trained into the store (a compartment, in any state, or a router)."""
        return bool(self._doc["compartments"]) or self._doc["router"] is not None

    # -- staged data (offline only: `cdm train` stages, then trains)

    def stage(self, source: str, fp: str) -> None:
        self._doc["staged"][source] = fp
        self._save()

    def staged(self) -> dict[str, str]:
        return dict(self._doc["staged"])

    # -- the Catalogue protocol

    def active(self) -> list[Entry]:
        return [
            self._entry(c)
            for c in sorted(self._doc["compartments"])
            if self._doc["compartments"][c]["status"] == "active"
        ]

    def versions(self, source: str) -> list[Entry]:
        n = int(self._doc["versions"].get(source, 0))
        return [self._entry(f"{source}@v{v}") for v in range(1, n + 1) if f"{source}@v{v}" in self._doc["compartments"]]

    def router(self) -> RouterEntry | None:
        r = self._doc["router"]
        if r is None:
            return None
        return RouterEntry(
            router_id=r["router_id"],
            compartment_ids=tuple(r["compartment_ids"]),
            files=stored_files_from_dict(r["files"]),
            artifact_uri=r.get("artifact_uri", ""),
            trained_at_epoch=int(r.get("trained_at_epoch", 0)),
            metrics=r.get("metrics", {}),
        )

    def begin_training(self, source: str, fingerprint: str, lineage: Mapping[str, Any]) -> Entry:
        comps = self._doc["compartments"]
        existing = self._doc["fingerprints"].get(source, {}).get(fingerprint)
        if existing is not None and comps.get(existing, {}).get("status") in ("training", "active"):
            return self._entry(existing)
        version = int(self._doc["versions"].get(source, 0)) + 1
        cid = f"{source}@v{version}"
        now = self._clock()
        for other in self.versions(source):
            if other.status == "training":
                comps[other.compartment_id].update(status="retired", retired_reason=f"superseded by {cid}")
        comps[cid] = {
            "source": source,
            "status": "training",
            "fingerprint": fingerprint,
            "lineage": json.loads(json.dumps(dict(lineage))),
            "created_at": now,
        }
        self._doc["versions"][source] = version
        self._doc["fingerprints"].setdefault(source, {})[fingerprint] = cid
        self._save()
        return self._entry(cid)

    def activate(
        self,
        compartment_id: str,
        *,
        artifact_uri: str,
        files: Mapping[str, StoredFile],
        prior: float,
        class_counts: Sequence[int],
        n_samples: int,
        train_metrics: Mapping[str, Any],
    ) -> Entry:
        comps = self._doc["compartments"]
        record = comps.get(compartment_id)
        if record is None:
            raise StoreError(f"no compartment {compartment_id!r} in {self.path}")
        if record["status"] == "active":
            return self._entry(compartment_id)
        if record["status"] == "retired":
            raise StoreError(f"{compartment_id} is retired ({record.get('retired_reason')}); it cannot be activated")
        for other in self.versions(record["source"]):
            if other.status == "active":
                comps[other.compartment_id].update(status="retired", retired_reason=f"replaced by {compartment_id}")
        record.update(
            status="active",
            artifact_uri=artifact_uri,
            files=_files_doc(files),
            prior=float(prior),
            class_counts=list(class_counts),
            n_samples=int(n_samples),
            train_metrics=json.loads(json.dumps(dict(train_metrics))),
            updated_at=self._clock(),
        )
        self._doc["staged"].pop(record["source"], None)
        self._doc["epoch"] += 1
        self._save()
        return self._entry(compartment_id)

    def set_router(self, router: RouterEntry, *, priors: Mapping[str, float]) -> None:
        for cid, prior in priors.items():
            if self._doc["compartments"].get(cid, {}).get("status") == "active":
                self._doc["compartments"][cid]["prior"] = float(prior)
        self._doc["router"] = {
            "router_id": router.router_id,
            "compartment_ids": list(router.compartment_ids),
            "files": _files_doc(router.files),
            "artifact_uri": router.artifact_uri,
            "trained_at_epoch": self.epoch,
            "metrics": json.loads(json.dumps(dict(router.metrics))),
        }
        self._doc["epoch"] += 1
        self._save()

    def clear_router(self) -> None:
        if self._doc["router"] is not None:
            self._doc["router"] = None
            self._doc["epoch"] += 1
            self._save()

    def forget_source(self, source: str, *, request_id: str, files_sha256: Sequence[str]) -> Tombstone:
        existing = self.tombstone(source)
        if existing is not None and existing.request_id == request_id:
            return existing
        comps = self._doc["compartments"]
        live = [v for v in self.versions(source) if v.status != "retired"]
        for v in self.versions(source):
            record = comps[v.compartment_id]
            record.pop("fingerprint", None)
            record.pop("lineage", None)
            if v.status != "retired":
                record.update(status="retired", retired_reason=f"forgotten: {request_id}")
        self._doc["fingerprints"].pop(source, None)
        self._doc["staged"].pop(source, None)
        if any(v.status == "active" for v in live):
            self._doc["epoch"] += 1
        tomb = Tombstone(
            source=source,
            forgotten_at=self._clock(),
            request_id=request_id,
            epoch=self.epoch,
            files_sha256=tuple(sorted(set(files_sha256))),
            compartment_ids=tuple(v.compartment_id for v in live),
        )
        self._doc["tombstones"][source] = dataclasses.asdict(tomb)
        self._save()
        return tomb

    def scrub(self, compartment_id: str) -> None:
        record = self._doc["compartments"][compartment_id]
        if record["status"] != "retired":
            raise StoreError(f"{compartment_id} is {record['status']}; only retired compartments are scrubbed")
        fp = record.pop("fingerprint", None)
        record.pop("lineage", None)
        fps = self._doc["fingerprints"].get(record["source"], {})
        if fp is not None and fps.get(fp) == compartment_id:
            del fps[fp]
        self._save()

    def tombstone(self, source: str) -> Tombstone | None:
        t = self._doc["tombstones"].get(source)
        if t is None:
            return None
        return Tombstone(
            **{**t, "files_sha256": tuple(t["files_sha256"]), "compartment_ids": tuple(t["compartment_ids"])}
        )

    def _journal_path(self, request_id: str) -> Path:
        if not re.fullmatch(r"[A-Za-z0-9._:-]{1,128}", request_id) or request_id.startswith("."):
            raise StoreError(f"request id {request_id!r} cannot name a journal file; use letters, digits, . _ : -")
        return self.root / "journal" / f"{request_id}.json"

    def journal(self, request_id: str) -> dict[str, Any] | None:
        path = self._journal_path(request_id)
        return dict(read_json(path)) if path.exists() else None

    def save_journal(self, request_id: str, doc: Mapping[str, Any]) -> None:
        write_json(self._journal_path(request_id), dict(doc))

    def journals(self) -> list[dict[str, Any]]:
        d = self.root / "journal"
        return [dict(read_json(p)) for p in sorted(d.glob("*.json"))] if d.is_dir() else []

    def put_receipt(self, receipt: ForgetReceipt) -> bool:
        if receipt.request_id in self._doc["receipts"]:
            return False
        name = f"{int(receipt.completed_at * 1000)}-{receipt.source}.json"
        write_json(self.root / "receipts" / name, receipt.to_dict())
        self._doc["receipts"][receipt.request_id] = name
        self._save()
        return True

    def receipt(self, request_id: str) -> ForgetReceipt | None:
        name = self._doc["receipts"].get(request_id)
        return ForgetReceipt.from_dict(read_json(self.root / "receipts" / name)) if name else None


# --------------------------------------------------------------------------------------------- the store


class LocalStore:
    """A directory holding compartments, the router and kept source data, run by ``cdm.lifecycle``."""

    def __init__(self, root: Path | str, *, model: ModelConfig | None = None) -> None:
        self.root = Path(root)
        meta = self.root / "store.json"
        if meta.exists():
            doc = read_json(meta)
            if doc.get("format") != FORMAT:
                raise StoreError(
                    f"{self.root} is a format-{doc.get('format')} store; this cdm reads format {FORMAT} (compartments "
                    "by id, kept data by fingerprint). Train into a new --store directory."
                )
            stored = build(ModelConfig, doc["model"])
            if model is not None and model != stored:
                raise StoreError(
                    f"{self.root} was created with [model] {to_dict(stored)}, not {to_dict(model)}; compartments "
                    "of one store must share an architecture. Use another --store or the original config."
                )
            self.model = stored
        else:
            self.model = model or ModelConfig()
            write_json(meta, {"format": FORMAT, "model": to_dict(self.model)})
        self.artifacts = DirectoryStore(self.root.resolve())
        self.catalogue = LocalCatalogue(self.root / "catalogue.json")

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    def lifecycle(
        self,
        *,
        train: TrainConfig | None = None,
        router: RouterConfig | None = None,
        router_kind: RouterKind | None = None,
        progress: bool = True,
        should_stop: Callable[[], bool] | None = None,
        on_step: Callable[[int, float], None] | None = None,
        after_step: Callable[[str], None] | None = None,
    ) -> Lifecycle:
        """The shared lifecycle over this store (the daemon's worker runs the same one over the registry), under
        ``router_kind`` (default: the store's, ``routing_kind()``; another one is not checked here)."""
        step = None
        if on_step is not None:
            callback = on_step

            def step(source: str, i: int, steps: int, loss: float) -> None:
                callback(i, loss)

        return Lifecycle(
            self.catalogue,
            self.artifacts,
            model=self.model,
            train=train or TrainConfig(),
            router=router or RouterConfig(),
            work_root=self.root,
            router_kind=router_kind if router_kind is not None else self.routing_kind(),
            trainer_id="offline",
            progress=progress,
            should_stop=should_stop,
            on_step=step,
            after_step=after_step,
        )

    # -- the routing kind --------------------------------------------------------------------------
    def routing_kind(self) -> RoutingKind:
        """The kind the store's compartments were trained under (recorded at its first training; "learnt" for a
        store older than that record, or one that has trained nothing yet)."""
        return check_kind(self.catalogue.routing() or "learnt")

    def use_routing(self, kind: str, *, record: bool = True) -> RoutingKind:
        """``kind`` (``[router] kind``) checked against the store's: recorded when the store has trained nothing
        yet (``record``), else it must be the store's kind. StoreError naming both kinds and the ways on otherwise."""
        kind = check_kind(kind)
        if not self.catalogue.trained_any():
            if record:
                self.catalogue.set_routing(kind)
            return kind
        stored = self.routing_kind()
        if kind != stored:
            raise StoreError(
                f"{self.root} was trained under [router] kind = {stored!r}, not {kind!r}: its compartments carry no "
                f"heads or router for another kind, and one store never mixes kinds. Set [router] kind = {stored!r} "
                f"in the config to use this store, or train the sources into a new --store directory under {kind!r}."
            )
        return stored

    # -- paths and queries -----------------------------------------------------------------------
    def _current(self, name: str) -> Entry | None:
        return next((e for e in self.catalogue.active() if e.source == check_source_name(name)), None)

    def _local(self, key: str) -> Path:
        return confined_path(self.artifacts.url(key), self.artifacts.root)

    def compartment_dir(self, name: str) -> Path:
        """The directory of the newest version of ``name`` (it does not exist once forgotten)."""
        versions = self.catalogue.versions(check_source_name(name))
        if not versions:
            return self.root / "compartments" / name
        return self._local(compartment_prefix(versions[-1].compartment_id))

    def data_path(self, name: str) -> Path:
        """The kept data file of ``name`` (its staged or active data; it does not exist once forgotten)."""
        current = self._current(name)
        fp = self.catalogue.staged().get(name) or (current.fingerprint if current else "")
        return self._local(data_key(name, fp)) if fp else self.root / "data" / check_source_name(name)

    @property
    def router_dir(self) -> Path:
        router = self.catalogue.router()
        return self._local(router_prefix(router.router_id)) if router else self.root / "routers"

    def sources(self) -> list[str]:
        """Sources with an active compartment, sorted by name."""
        return sorted(e.source for e in self.catalogue.active())

    def staged(self) -> list[str]:
        return sorted(set(self.catalogue.staged()) | set(self.sources()))

    def manifest(self, name: str) -> CompartmentManifest:
        """The compartment's manifest, with its prior as the catalogue records it (the artifact is never edited)."""
        current = self._current(name)
        if current is None:
            raise StoreError(f"no trained compartment {name!r} in {self.root}; known: {self.sources()}")
        manifest = CompartmentManifest.from_dict(
            read_json(self._local(compartment_prefix(current.compartment_id)) / "manifest.json")
        )
        return dataclasses.replace(manifest, prior=current.prior or None)

    def router_manifest(self) -> RouterManifest | None:
        router = self.catalogue.router()
        return RouterManifest(**read_json(self.router_dir / "manifest.json")) if router else None

    # -- data ------------------------------------------------------------------------------------
    def stage_data(self, name: str, data: SourceData) -> Path:
        """Keep a copy of the source's data (the router is retrained from it; forgetting deletes it)."""
        check_source_name(name)
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
        fp = fingerprint(data)
        self.lifecycle(progress=False).keep_data(name, data, fp)
        self.catalogue.stage(name, fp)
        return self._local(data_key(name, fp))

    def load_data(self, name: str) -> SourceData:
        path = self.data_path(name)
        if not path.is_file():
            raise StoreError(f"no staged data for source {name!r} in {self.root}; stage it with `cdm train --source`")
        return load_npz(path)

    # -- training --------------------------------------------------------------------------------
    def is_trained(self, name: str, fp: str) -> bool:
        """True if the compartment for ``name`` exists and was trained on data with fingerprint ``fp``."""
        current = self._current(name)
        return current is not None and current.fingerprint == fp

    def train_compartment(
        self,
        name: str,
        train: TrainConfig,
        *,
        progress: bool = True,
        should_stop: Callable[[], bool] | None = None,
        on_step: Callable[[int, float], None] | None = None,
        router: RouterConfig | None = None,
    ) -> TrainResult:
        """Train (or resume) the compartment of a staged source and register it (the shared train plan); under the
        heads kind its head too (``router``: the head's training settings and ``[router] kind``, checked against the
        store's kind and recorded by the first training; None: the store's kind, default settings)."""
        data = self.load_data(name)
        kind = self.use_routing(router.kind if router is not None else self.routing_kind())
        lc = self.lifecycle(
            train=train, router=router, router_kind=kind, progress=progress, should_stop=should_stop, on_step=on_step
        )
        outcome = lc.train(name, data, lineage={"source": name, "staged": str(self.data_path(name))})
        if outcome.result is None:  # this data is trained already
            return TrainResult(None, False, 0, float("nan"), 0.0, 0)
        return outcome.result

    def train_router(
        self,
        cfg: RouterConfig,
        *,
        progress: bool = True,
        should_stop: Callable[[], bool] | None = None,
        router_kind: RouterKind | None = None,
    ) -> RouterResult | None:
        """Retrain the learnt router over every trained source (None and no router when the store is empty, or its
        kind needs none). The kind is ``cfg.kind`` checked against the store's, unless ``router_kind`` names one."""
        kind = router_kind if router_kind is not None else self.use_routing(cfg.kind)
        outcome = self.lifecycle(router=cfg, progress=progress, should_stop=should_stop, router_kind=kind)
        result = outcome.retrain_router()
        return result.result if result is not None else None

    # -- loading and sampling ------------------------------------------------------------------------
    def load_compartment(self, name: str, *, device: str | torch.device = "cpu") -> Compartment:
        current = self._current(name)
        if current is None:
            raise StoreError(f"no trained compartment {name!r} in {self.root}; known: {self.sources()}")
        directory = self._local(compartment_prefix(current.compartment_id))
        return Compartment.load(directory, device=device, expected_sha256=_manifest_sha(current.files))

    def _router(self, *, device: str | torch.device = "cpu") -> tuple[Router, list[str]]:
        kind = self.routing_kind()
        if kind != "learnt":
            raise StoreError(f"{self.root} composes under the {kind!r} routing kind, which has no learnt router")
        router = self.catalogue.router()
        if router is None:
            raise StoreError(f"{self.root} has no router; run `cdm train --store {self.root}` first")
        active = [e.compartment_id for e in self.catalogue.active()]
        if sorted(router.compartment_ids) != sorted(active):
            raise StoreError(
                f"the router in {self.root} was trained on {list(router.compartment_ids)} but the store holds "
                f"{active}; retrain it with `cdm train --store {self.root}`"
            )
        model, _ = load_router(self.router_dir, device=device, expected_sha256=_manifest_sha(router.files))
        return model, [source_of(c) for c in router.compartment_ids]

    def load_router(self, *, device: str | torch.device = "cpu") -> Router:
        return self._router(device=device)[0]

    def composed(
        self,
        *,
        device: str | torch.device = "cpu",
        mode: Mode = "full",
        top_k: int = 1,
        subset: Sequence[str] | None = None,
        vectorize: Vectorize = "auto",
    ) -> Composed:
        """Every compartment of the store composed under the store's routing kind (``routing_kind()``): the learnt
        kind with its router, the heads kind with the compartments' heads, the density kind with priors and class
        counts from their manifests. ``mode``/``top_k`` apply to the learnt and heads kinds (the density kind runs
        every allowed compartment: ConfigError for mode "top_k")."""
        names = self.sources()
        if not names:
            raise StoreError(f"{self.root} holds no compartments; train some with `cdm train`")
        kind = self.routing_kind()
        if kind == "learnt":
            router, router_names = self._router(device=device)
            comps = [self.load_compartment(n, device=device) for n in names]
            return ComposedDenoiser(
                comps,
                router,
                names,
                router_names=router_names,
                mode=mode,
                top_k=top_k,
                subset=subset,
                vectorize=vectorize,
            )
        if kind == "density" and mode != "full":
            raise ConfigError(
                f"{self.root} composes by density, which runs every allowed compartment: mode {mode!r} does not "
                'apply; use [sample] mode = "full"'
            )
        comps = [self.load_compartment(n, device=device) for n in names]
        den = compose_trained(kind, comps, names, vectorize=vectorize, subset=subset)
        if isinstance(den, ComposedDenoiser):  # the heads kind: the learnt kind's options too
            return den.configured(mode=mode, top_k=top_k)
        return den

    def pipeline(
        self, *, device: str | torch.device = "cpu", scheduler: str = "dpm", vectorize: Vectorize = "auto"
    ) -> CompartmentalPipeline:
        return CompartmentalPipeline(
            self.composed(device=device, vectorize=vectorize), make_scheduler(scheduler, self.model)
        )

    # -- forgetting ------------------------------------------------------------------------------
    def _request_id(self, kind: str, name: str, ids: Sequence[int]) -> str:
        """The unfinished request of the same forget (a rerun after a crash finishes it), or a new id."""
        want = sorted({int(i) for i in ids})
        for doc in self.catalogue.journals():
            same = (doc.get("kind"), doc.get("source"), doc.get("sample_ids")) == (kind, name, want)
            if same and "receipt" not in doc.get("done", ()):
                return str(doc["request_id"])
        return uuid.uuid4().hex

    def forget_source(
        self,
        name: str,
        router: RouterConfig,
        *,
        progress: bool = True,
        request_id: str | None = None,
        after_step: Callable[[str], None] | None = None,
    ) -> ForgetReceipt:
        """Exact forgetting of a whole source: retire it, retrain the router (learnt kind), delete every artifact of
        it. ``router.kind`` must be the store's."""
        kind = self.use_routing(router.kind, record=False)
        known = {v.source for v in self.catalogue.active()} | set(self.catalogue.staged())
        rid = request_id or self._request_id("forget-source", name, ())
        if name not in known and self.catalogue.journal(rid) is None:
            raise StoreError(f"no source {name!r} in {self.root}; known: {sorted(known)}")
        lc = self.lifecycle(router=router, router_kind=kind, progress=progress, after_step=after_step)
        return lc.forget_source(name, request_id=rid)

    def forget_samples(
        self,
        name: str,
        ids: Sequence[int],
        train: TrainConfig,
        router: RouterConfig,
        *,
        progress: bool = True,
        request_id: str | None = None,
        after_step: Callable[[str], None] | None = None,
    ) -> ForgetReceipt:
        """Exact forgetting of some samples: retrain only this source's compartment and the router. With SISA slices
        (``train.slices > 1``) the compartment is retrained from its checkpoint before the first slice holding one of
        the samples; with one slice, from scratch.

        Ids the source does not hold are listed in the receipt; when none matches, nothing changes. ``router.kind``
        must be the store's (under the heads kind the retrained compartment gets a new head)."""
        kind = self.use_routing(router.kind, record=False)
        rid = request_id or self._request_id("forget-samples", name, ids)
        lc = self.lifecycle(train=train, router=router, router_kind=kind, progress=progress, after_step=after_step)
        return lc.forget_samples(name, ids, request_id=rid)


def _manifest_sha(files: Mapping[str, StoredFile]) -> dict[str, str]:
    """The {rel: sha256} a manifest records (every file but the manifest itself)."""
    return {rel: f.sha256 for rel, f in files.items() if rel != "manifest.json"}
