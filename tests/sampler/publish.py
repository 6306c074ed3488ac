"""Writer-side helpers for the sampler tests: tiny artifacts saved, uploaded to a store and registered.

What the lifecycle writes at activation (``files``) and at forgetting (``ns:tombstone:{source}``) is written here
through the registry's own codec, so the sampler reads exactly the records the daemon will write.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import redis
import torch

from cdm.artifacts import ArtifactStore, upload_directory
from cdm.compartment import WEIGHTS, Compartment, build_unet, new_manifest
from cdm.config import ModelConfig, TrainConfig
from cdm.routing import WEIGHTS as ROUTER_WEIGHTS
from cdm.routing import Router, RouterManifest, save_router
from registry.keys import Keys
from registry.records import CompartmentRecord, RouterRecord, StoredFile, Tombstone, to_hash
from registry.writer import Registry
from tests.cdm.conftest import TINY_MODEL


def registry_files(files: Mapping[str, object]) -> dict[str, StoredFile]:
    """cdm.artifacts.StoredFile -> the registry's record of it (same fields)."""
    return {rel: StoredFile(f.uri, f.sha256, f.size) for rel, f in files.items()}  # type: ignore[attr-defined]


def save_tiny_compartment(directory: Path, name: str, seed: int, model: ModelConfig = TINY_MODEL) -> Compartment:
    """An untrained tiny compartment (weights drawn from ``seed``) saved in ``directory``."""
    torch.manual_seed(seed)
    manifest = new_manifest(
        name, fingerprint=f"{seed:064x}", n_samples=1, class_counts=[1] * 10, num_classes=10, model=model,
        train=TrainConfig(),
    )  # fmt: skip
    comp = Compartment(build_unet(model, 10), manifest).eval()
    comp.save(directory)  # sets comp.manifest's sha256s
    return comp


def publish_compartment(
    reg: Registry,
    client: redis.Redis,
    keys: Keys,
    store: ArtifactStore,
    workdir: Path,
    source: str,
    *,
    seed: int,
    compartment: Compartment | None = None,
    with_files: bool = True,
    missing_weights: bool = False,
) -> CompartmentRecord:
    """begin_training -> save (or take ``compartment``) -> upload -> files -> activate, like the daemon's worker;
    ``missing_weights`` deletes the uploaded weights before the activation."""
    rec = reg.begin_training(source, f"fp-{source}-{seed}", {"test": True})
    local = workdir / "compartments" / rec.compartment_id
    comp = compartment if compartment is not None else save_tiny_compartment(local, rec.compartment_id, seed)
    if compartment is not None:
        comp.save(local)
    prefix = f"compartments/{rec.compartment_id}"
    files: dict[str, StoredFile] = {}
    if with_files:
        files = registry_files(upload_directory(store, local, prefix))
        uri = store.url(prefix)
        if missing_weights:
            store.delete(f"{prefix}/{WEIGHTS}")
    else:
        uri = local.resolve().as_uri()
    return reg.activate(
        rec.compartment_id,
        artifact_uri=uri,
        sha256=comp.manifest.sha256,
        prior=0.5,
        class_counts=comp.manifest.class_counts,
        n_samples=comp.manifest.n_samples,
        train_metrics={},
        files=files,
    )


def save_tiny_router(directory: Path, compartment_ids: Sequence[str], seed: int = 0) -> RouterManifest:
    torch.manual_seed(seed)
    names = [cid.rsplit("@", 1)[0] for cid in compartment_ids]
    router = Router(source_names=names, sample_size=TINY_MODEL.sample_size, channels=(16, 32), num_classes=10)
    manifest = RouterManifest(
        source_names=names, fingerprints={}, n_samples={}, num_classes=10, model={}, router={}, report={}
    )
    return save_router(router, manifest, directory)


def publish_router(
    reg: Registry,
    store: ArtifactStore,
    workdir: Path,
    router_id: str,
    compartment_ids: Sequence[str],
    *,
    with_files: bool = True,
    missing_weights: bool = False,
) -> RouterRecord:
    """Save, upload and register a tiny router (weights drawn from its id: identical bytes would share one cached
    blob); ``missing_weights`` deletes its weights from the store first."""
    local = workdir / "routers" / router_id
    manifest = save_tiny_router(local, compartment_ids, zlib.crc32(router_id.encode()))
    prefix = f"routers/{router_id}"
    files = registry_files(upload_directory(store, local, prefix)) if with_files else {}
    if missing_weights:
        store.delete(f"{prefix}/{ROUTER_WEIGHTS}")
    record = RouterRecord(
        router_id=router_id,
        artifact_uri=store.url(prefix) if with_files else local.resolve().as_uri(),
        sha256=manifest.sha256,
        files=files,
        compartment_ids=tuple(compartment_ids),
        trained_at_epoch=reg.epoch(),
    )
    reg.set_router(record)
    return record


def write_tombstone(
    client: redis.Redis,
    keys: Keys,
    source: str,
    files_sha256: Sequence[str],
    *,
    forgotten_at: float | None = None,
    epoch: int = 0,
) -> Tombstone:
    """The registry fact the lifecycle writes when ``source`` is forgotten."""
    tomb = Tombstone(
        source=source,
        forgotten_at=time.time() if forgotten_at is None else forgotten_at,
        epoch=epoch,
        request_id=f"forget-{source}-{time.monotonic_ns()}",
        through={"cdm.sources:0": 41},
        files_sha256=tuple(files_sha256),
    )
    client.hset(keys.tombstone(source), mapping=to_hash(tomb))  # type: ignore[arg-type]
    return tomb
