"""sampler/forgetting.py: which compartments and routers tombstones refuse, and which cached files they purge."""

from __future__ import annotations

from registry.reader import Tombstones
from registry.records import (
    CompartmentRecord,
    CompartmentStatus,
    RegistrySnapshot,
    RouterRecord,
    StoredFile,
    Tombstone,
)
from sampler.forgetting import purgeable, serving_snapshot

W = "unet/diffusion_pytorch_model.safetensors"


def record(source: str, version: int, created_at: float, weights: str, config: str = "c" * 64) -> CompartmentRecord:
    files = {
        W: StoredFile(f"s3://b/{source}/w", weights, 10),
        "unet/config.json": StoredFile(f"s3://b/{source}/c", config, 1),
        "manifest.json": StoredFile(f"s3://b/{source}/m", f"{version}{source}".ljust(64, "0"), 1),
    }
    return CompartmentRecord(
        f"{source}@v{version}", source, version, CompartmentStatus.ACTIVE, created_at=created_at, files=files
    )


def test_tombstones_refuse_what_predates_them_or_carries_forgotten_weights() -> None:
    old = record("shoes", 1, created_at=100.0, weights="1" * 64)
    copy = record("shoes", 2, created_at=300.0, weights="1" * 64)  # the forgotten weights registered again
    fresh = record("shoes", 3, created_at=300.0, weights="3" * 64)  # trained on data sent after the forget
    bags = record("bags", 1, created_at=100.0, weights="2" * 64)
    hats = record("hats", 1, created_at=100.0, weights="4" * 64)
    router = RouterRecord("r", "s3://b/r", sha256={"diffusion_pytorch_model.safetensors": "1" * 64})
    tombs = Tombstones(
        {"shoes": Tombstone("shoes", 200.0, 5, "req", {}, ("1" * 64, "c" * 64, "1shoes".ljust(64, "0")))},
        {"hats": "Tombstone.forgotten_at = 'x' cannot be decoded"},
    )
    snap = RegistrySnapshot(7, (bags, hats, old, copy, fresh), router)
    serving = serving_snapshot(snap, tombs)
    assert serving.snapshot.compartment_ids == ("bags@v1", "shoes@v3") and serving.snapshot.router is None
    assert serving.snapshot.epoch == 7
    assert set(serving.refused) == {"hats@v1", "shoes@v1", "shoes@v2", "router r"}
    assert "forgotten at 200.000" in serving.refused["shoes@v1"] and "weights" in serving.refused["shoes@v2"]
    assert "cannot be decoded" in serving.refused["hats@v1"]
    # nothing forgotten: the snapshot as it is
    assert serving_snapshot(snap, Tombstones({}, {})).snapshot == snap


def test_purge_spares_files_that_what_is_served_still_uses() -> None:
    bags = record("bags", 1, created_at=100.0, weights="2" * 64)
    tombs = Tombstones({"shoes": Tombstone("shoes", 200.0, 5, "req", {}, ("1" * 64, "c" * 64))}, {})
    assert purgeable(tombs, [bags]) == {("shoes", "req"): frozenset({"1" * 64})}  # c...c is bags' config too
    assert purgeable(tombs, []) == {("shoes", "req"): frozenset({"1" * 64, "c" * 64})}
