"""What a sampler may serve once sources are forgotten: tombstones refuse artifacts and name the blobs to purge.

A tombstone (``registry.records.Tombstone``, key ``ns:tombstone:{source}``) is a registry fact written when a
source is forgotten. Before anything is loaded or served, a sampler removes from the registry's composition

* every compartment of a tombstoned source created at or before ``forgotten_at`` (compartments trained later are
  trained on data sent after the forget, which the daemon's own tombstone check admitted);
* every compartment or router whose weights (a ``.safetensors`` file) have a sha256 that a tombstone lists;
* every compartment of a source whose tombstone exists but cannot be decoded (fail closed).

Its local cache then deletes the blobs that tombstones list, except those still referenced by what it serves
(such as a ``unet/config.json`` shared byte for byte with other compartments), so exact forgetting reaches the
hosts that only read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from registry.reader import Tombstones
from registry.records import CompartmentRecord, RegistrySnapshot, RouterRecord

WEIGHTS_SUFFIX = ".safetensors"  # the files that carry what was learnt from the data


def recorded_sha256(record: CompartmentRecord | RouterRecord) -> dict[str, str]:
    """relative path -> sha256 of an artifact's files as the registry records them (``files``, else ``sha256``)."""
    if record.files:
        return {rel: f.sha256 for rel, f in record.files.items()}
    return dict(record.sha256)


def forgotten_sha256(tombstones: Tombstones) -> frozenset[str]:
    """Every sha256 that a readable tombstone lists."""
    return frozenset(d for t in tombstones.by_source.values() for d in t.files_sha256)


def compartment_refusal(record: CompartmentRecord, tombstones: Tombstones, forgotten: frozenset[str]) -> str | None:
    """Why ``record`` must not be loaded or served because of a tombstone, or None if it may be."""
    if record.source in tombstones.unreadable:
        return f"its source {record.source!r} has a tombstone that cannot be decoded (treated as forgotten)"
    tomb = tombstones.by_source.get(record.source)
    if tomb is not None and record.created_at <= tomb.forgotten_at:
        return f"its source {record.source!r} was forgotten at {tomb.forgotten_at:.3f} (request {tomb.request_id!r})"
    listed = _listed_weights(record, forgotten)
    if listed:
        return f"its weights {listed} are listed by a tombstone"
    return None


def router_refusal(record: RouterRecord, forgotten: frozenset[str]) -> str | None:
    """Why the router must not be loaded or served because of a tombstone, or None if it may be."""
    listed = _listed_weights(record, forgotten)
    return f"its weights {listed} are listed by a tombstone" if listed else None


def _listed_weights(record: CompartmentRecord | RouterRecord, forgotten: frozenset[str]) -> list[str]:
    return sorted(rel for rel, d in recorded_sha256(record).items() if rel.endswith(WEIGHTS_SUFFIX) and d in forgotten)


@dataclass(frozen=True)
class Serving:
    """A registry snapshot less what tombstones refuse."""

    snapshot: RegistrySnapshot  # what may be served: refused compartments (and a refused router) removed
    refused: Mapping[str, str]  # compartment id, or "router <id>", -> why it is not served


def serving_snapshot(snap: RegistrySnapshot, tombstones: Tombstones) -> Serving:
    """``snap`` without the compartments and router that ``tombstones`` forbid."""
    forgotten = forgotten_sha256(tombstones)
    refused: dict[str, str] = {}
    keep = []
    for record in snap.compartments:
        why = compartment_refusal(record, tombstones, forgotten)
        if why is None:
            keep.append(record)
        else:
            refused[record.compartment_id] = why
    router = snap.router
    if router is not None and (why := router_refusal(router, forgotten)) is not None:
        refused[f"router {router.router_id}"] = why
        router = None
    return Serving(dataclasses.replace(snap, compartments=tuple(keep), router=router), refused)


def purgeable(
    tombstones: Tombstones, served: Iterable[CompartmentRecord | RouterRecord]
) -> dict[tuple[str, str], frozenset[str]]:
    """(source, request id) -> the sha256s its tombstone lists, less those of the ``served`` artifacts."""
    keep = {d for record in served for d in recorded_sha256(record).values()}
    return {
        (source, t.request_id): frozenset(t.files_sha256) - keep
        for source, t in sorted(tombstones.by_source.items())
        if t.files_sha256
    }
