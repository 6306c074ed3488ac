"""The daemon's catalogue for ``cdm.lifecycle``: the Redis registry seen through ``cdm.lifecycle.Catalogue``.

Compartment and router records carry their uploaded ``files`` ({relative path: {uri, sha256, size}}); ``sha256``
is derived from them as the artifact's manifest records it (every file except ``manifest.json``), which is what
readers verify against. Forget journals and receipts are JSON documents in the registry keyed by request id; the
tombstone is written in the forget transaction with the source's last offsets per partition (from the lineage of
its compartments and of this replica's spool).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from cdm.artifacts import MANIFEST, StoredFile
from cdm.lifecycle import Entry, ForgetReceipt, RouterEntry, Tombstone, through_of
from registry import records
from registry.records import CompartmentRecord, RouterRecord
from registry.records import Tombstone as TombstoneRecord
from registry.writer import Registry


def manifest_sha256(files: Mapping[str, StoredFile]) -> dict[str, str]:
    """{relative path: sha256} as the artifact's manifest records it (every file but the manifest itself)."""
    return {rel: f.sha256 for rel, f in files.items() if rel != MANIFEST}


def files_doc(files: Mapping[str, StoredFile]) -> dict[str, records.StoredFile]:
    """The registry's copy of uploaded files (the registry does not import cdm: its own StoredFile, field for field)."""
    return {rel: records.StoredFile(f.uri, f.sha256, f.size) for rel, f in files.items()}


def files_of(files: Mapping[str, records.StoredFile]) -> dict[str, StoredFile]:
    return {rel: StoredFile(f.uri, f.sha256, f.size) for rel, f in files.items()}


def entry_of(record: CompartmentRecord) -> Entry:
    return Entry(
        compartment_id=record.compartment_id,
        source=record.source,
        status=record.status.value,
        fingerprint=record.fingerprint,
        n_samples=record.n_samples,
        files=files_of(record.files),
        lineage=record.lineage,
        prior=record.prior,
    )


def tombstone_of(record: TombstoneRecord) -> Tombstone:
    return Tombstone(
        source=record.source,
        forgotten_at=record.forgotten_at,
        request_id=record.request_id,
        epoch=record.epoch,
        through={str(k): int(v) for k, v in record.through.items()},
        files_sha256=record.files_sha256,
        compartment_ids=record.compartment_ids,
    )


class RegistryCatalogue:
    """``cdm.lifecycle.Catalogue`` over the Redis registry.

    Args:
        registry: the registry writer.
        local_lineage: the lineage of a source in this replica's spool (JSON-able, None when it holds none); its
            offsets go into the tombstone's ``through`` with those of the source's compartments.
        clock: unix seconds (router records' ``created_at``).
    """

    def __init__(
        self,
        registry: Registry,
        *,
        local_lineage: Callable[[str], Mapping[str, Any] | None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry
        self.local_lineage = local_lineage
        self.clock = clock

    def active(self) -> list[Entry]:
        return [entry_of(c) for c in self.registry.snapshot().compartments]

    def versions(self, source: str) -> list[Entry]:
        return [entry_of(r) for r in self.registry.history(source)]

    def router(self) -> RouterEntry | None:
        r = self.registry.snapshot().router
        if r is None:
            return None
        return RouterEntry(
            router_id=r.router_id,
            compartment_ids=r.compartment_ids,
            files=files_of(r.files),
            artifact_uri=r.artifact_uri,
            trained_at_epoch=r.trained_at_epoch,
            metrics=r.metrics,
        )

    def begin_training(self, source: str, fingerprint: str, lineage: Mapping[str, Any]) -> Entry:
        return entry_of(self.registry.begin_training(source, fingerprint, lineage))

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
        record = self.registry.activate(
            compartment_id,
            artifact_uri=artifact_uri,
            sha256=manifest_sha256(files),
            files=files_doc(files),
            prior=prior,
            class_counts=class_counts,
            n_samples=n_samples,
            train_metrics=train_metrics,
        )
        return entry_of(record)

    def set_router(self, router: RouterEntry, *, priors: Mapping[str, float]) -> None:
        record = RouterRecord(
            router_id=router.router_id,
            artifact_uri=router.artifact_uri,
            sha256=manifest_sha256(router.files),
            compartment_ids=router.compartment_ids,
            trained_at_epoch=self.registry.epoch(),
            metrics=dict(router.metrics),
            created_at=self.clock(),
            files=files_doc(router.files),
        )
        self.registry.set_router(record, priors=priors)

    def clear_router(self) -> None:
        self.registry.clear_router()

    def forget_source(self, source: str, *, request_id: str, files_sha256: Sequence[str]) -> Tombstone:
        lineages: list[Mapping[str, Any]] = [r.lineage for r in self.registry.history(source)]
        local = self.local_lineage(source) if self.local_lineage is not None else None
        if local is not None:
            lineages.append(local)
        previous = self.registry.tombstone(source)
        through = through_of(lineages)
        if previous is not None:  # a second forget of the source keeps covering what the first one did
            for key, offset in previous.through.items():
                through[key] = max(int(offset), through.get(key, -1))
        record = self.registry.forget_source(
            source, request_id=request_id, reason=request_id, through=through, files_sha256=files_sha256
        )
        return tombstone_of(record)

    def scrub(self, compartment_id: str) -> None:
        self.registry.scrub(compartment_id)

    def tombstone(self, source: str) -> Tombstone | None:
        record = self.registry.tombstone(source)
        return tombstone_of(record) if record is not None else None

    def journal(self, request_id: str) -> dict[str, Any] | None:
        return self.registry.journal(request_id)

    def save_journal(self, request_id: str, doc: Mapping[str, Any]) -> None:
        self.registry.save_journal(request_id, doc)

    def put_receipt(self, receipt: ForgetReceipt) -> bool:
        return self.registry.put_receipt(receipt.request_id, receipt.to_dict())

    def receipt(self, request_id: str) -> ForgetReceipt | None:
        doc = self.registry.receipt(request_id)
        return ForgetReceipt.from_dict(doc) if doc is not None else None
