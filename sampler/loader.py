"""Loading compositions from the registry: every artifact comes through the verified, content-addressed cache.

Each compartment and router is fetched from the artifact store into ``cdm.artifacts.ArtifactCache`` (sha256 checked
before anything decodes it, the cache bounded and LRU), loaded from the cache's own directory (never from a path
the registry names), and kept in memory by (id, sha256 of its files): an id whose recorded files change is loaded
again, an unchanged one never is. The cache pins the files of every artifact the served composition uses; they
are unpinned (and may be evicted) once a swap leaves them out.

Records list their files as ``files`` ({relative path: StoredFile(uri, sha256, size)}, any store). Records that
only have a ``file://`` ``artifact_uri`` and ``sha256`` (written before ``files`` existed) are read from the local
artifact store, which must contain that directory.
"""

from __future__ import annotations

import json
import logging
from collections import Counter as Tally
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, Protocol, TypeVar

from prometheus_client import Counter

from cdm.artifacts import (
    MANIFEST,
    ArtifactCache,
    ArtifactsConfig,
    Checkout,
    DirectoryStore,
    Discarded,
    StoredFile,
    open_cache,
    open_store,
    sha256_bytes,
)
from cdm.artifacts.local import file_url_path
from cdm.compartment import Compartment, has_head
from cdm.compose import Composed, Vectorize
from cdm.config import ModelConfig
from cdm.errors import CdmError, IntegrityError, StoreError
from cdm.fsio import sha256_file_size
from cdm.routing import Router, build_composition, load_router, needs_router, serving
from common.redact import redact_url
from registry.client import connect
from registry.config import RedisConfig
from registry.keys import Keys
from registry.reader import RegistryClient
from registry.records import CompartmentRecord, RegistrySnapshot, RouterRecord
from sampler.forgetting import recorded_sha256, serving_snapshot
from sampler.live import Composition

log = logging.getLogger(__name__)
MAX_JSON_BYTES = 1 << 20  # largest manifest or config read from an artifact
ArtifactKey = tuple[str, str]  # (compartment or router id, sha256 of its recorded {file: sha256})
M = TypeVar("M")


def artifact_key(record: CompartmentRecord | RouterRecord) -> ArtifactKey:
    """What identifies a loaded artifact: its id and the sha256 of the files the registry records for it."""
    ident = record.compartment_id if isinstance(record, CompartmentRecord) else record.router_id
    return ident, sha256_bytes(json.dumps(recorded_sha256(record), sort_keys=True).encode())


class LoadMetrics(Protocol):
    """The loader's metrics (``sampler.metrics.SamplerMetrics`` has them)."""

    artifact_loads: Counter


@dataclass
class _Loaded(Generic[M]):
    module: M
    checkout: Checkout  # pins the artifact's files in the cache while a composition uses it


class CompositionLoader:
    """Builds compositions from registry snapshots through an artifact cache.

    Args:
        cache: the verified local cache; its store is where every artifact must be.
        device: where compartments and routers are loaded.
        vectorize: how compositions evaluate their compartments (``[sample] vectorize``).
        metrics: optional count of artifacts loaded, by kind.
    """

    def __init__(
        self,
        cache: ArtifactCache,
        *,
        device: str = "cpu",
        vectorize: Vectorize = "auto",
        metrics: LoadMetrics | None = None,
    ) -> None:
        self.cache = cache
        self.device = device
        self.vectorize: Vectorize = vectorize
        self._metrics = metrics
        self._compartments: dict[ArtifactKey, _Loaded[Compartment]] = {}
        self._routers: dict[ArtifactKey, _Loaded[Router]] = {}
        self.loads: Tally[str] = Tally()  # artifacts fetched and decoded, by kind ("compartment", "router")
        self._headless_told: set[str] = set()  # compartments already logged as lacking a head (heads kind)

    @classmethod
    def from_config(
        cls,
        artifacts: ArtifactsConfig,
        *,
        default_dir: Path | None = None,
        base_dir: Path | None = None,
        environ: Mapping[str, str] | None = None,
        device: str = "cpu",
        vectorize: Vectorize = "auto",
        metrics: LoadMetrics | None = None,
    ) -> CompositionLoader:
        """A loader on the store and cache of ``[artifacts]``.

        Args:
            artifacts: the ``[artifacts]`` section (store URL, credentials, cache directory and bound).
            default_dir: the local artifact directory used as the store when ``artifacts.url`` is "".
            base_dir: where a relative ``artifacts.cache_dir`` lies (default: the working directory).
            environ: where AWS_* settings are read for what the section leaves empty (default os.environ).
        """
        store = open_store(artifacts, default_dir=default_dir, environ=environ)
        cache = open_cache(artifacts, store, base_dir=base_dir)
        return cls(cache, device=device, vectorize=vectorize, metrics=metrics)

    # -- compositions

    def build(self, snap: RegistrySnapshot) -> Composition | None:
        """The composition of ``snap``; None while there is nothing to serve (no compartment, the learnt kind
        without a router covering one, or the heads kind without a compartment that carries a head).

        ``snap`` must already be what may be served (``sampler.forgetting.serving_snapshot``)."""
        kind = snap.routing.value
        router_record = snap.router if needs_router(kind) else None  # the density kind uses no router
        routed = router_record.compartment_ids if router_record is not None else None
        if kind == "heads":  # served once its compartment carries a head
            routed = tuple(c.compartment_id for c in snap.compartments if has_head(c.sha256))
        served, pending = serving(kind, snap.compartment_ids, routed)
        if kind == "heads":
            self._tell_headless(pending)
        records = tuple(c for c in snap.compartments if c.compartment_id in set(served))
        if not records:
            return None
        # 1. the router (learnt kind), then the compartments: loaded unless cached under the same (id, sha256)
        router = self._router(router_record) if router_record is not None else None
        compartments = [self._compartment(rec) for rec in records]
        # 2. the composition under the registry's routing kind
        return self._compose(kind, snap.epoch, records, compartments, router_record, router, pending, degraded="")

    def _tell_headless(self, pending: Collection[str]) -> None:
        """Log, once per compartment (not at every build), the active compartments the heads kind cannot serve: a
        compartment trained under the heads kind carries its head before it is activated, so these were trained
        under another kind and stay pending until retrained or until the kind changes back."""
        new = [c for c in pending if c not in self._headless_told]
        if not new:
            return
        self._headless_told.update(new)
        log.warning(
            "routing kind 'heads': %d active compartment(s) carry no router head and stay pending: %s "
            "(newly seen: %s). They were trained under another [router] kind; retrain them under "
            '[router] kind = "heads" (forget-source, then push the source again) or set [router] kind back to '
            "the kind they were trained under.",
            len(pending),
            ", ".join(sorted(pending)),
            ", ".join(sorted(new)),
        )

    def restrict(self, comp: Composition, keep: Collection[str], *, epoch: int, reason: str) -> Composition | None:
        """``comp`` limited to the compartments in ``keep`` (ids), from memory; None if none is left."""
        records = tuple(r for r in comp.records if r.compartment_id in keep)
        if not records or (needs_router(comp.routing) and comp.router is None):
            return None
        router = self._routers[artifact_key(comp.router)].module if comp.router is not None else None
        compartments = [self._compartments[artifact_key(r)].module for r in records]
        pending = tuple(c for c in comp.pending if c in keep)
        return self._compose(comp.routing, epoch, records, compartments, comp.router, router, pending, degraded=reason)

    def _compose(
        self,
        kind: str,
        epoch: int,
        records: tuple[CompartmentRecord, ...],
        compartments: list[Compartment],
        router_record: RouterRecord | None,
        router: Router | None,
        pending: tuple[str, ...],
        *,
        degraded: str,
    ) -> Composition:
        ids = tuple(r.compartment_id for r in records)
        sources = tuple(r.source for r in records)
        router_sources = [_source_of(c) for c in router_record.compartment_ids] if router_record is not None else None
        den = build_composition(
            kind,
            compartments,
            sources,
            router=router,
            router_names=router_sources,
            n_samples=[r.n_samples for r in records],
            class_counts=[r.class_counts for r in records],
            vectorize=self.vectorize,
        )
        return Composition(
            epoch, den, ids, sources, pending, records=records, router=router_record, routing=kind, degraded=degraded
        )

    # -- pins and the cache

    def retain(self, keep: Iterable[CompartmentRecord | RouterRecord]) -> None:
        """Unpin and forget every loaded artifact but those of ``keep`` (the served composition's records)."""
        records = list(keep)
        keep_c = {artifact_key(r) for r in records if isinstance(r, CompartmentRecord)}
        keep_r = {artifact_key(r) for r in records if isinstance(r, RouterRecord)}
        for cache, kept in ((self._compartments, keep_c), (self._routers, keep_r)):
            for key in [k for k in cache if k not in kept]:
                cache.pop(key).checkout.close()

    def purge(self, digests: Collection[str]) -> Discarded:
        """Delete these blobs from the local cache (those a served artifact still pins are kept and reported)."""
        return self.cache.discard(digests)

    def close(self) -> None:
        """Unpin everything (the loaded modules stay usable)."""
        self.retain(())

    @property
    def loaded(self) -> frozenset[ArtifactKey]:
        """(id, sha256) of every compartment in memory."""
        return frozenset(self._compartments)

    # -- one artifact

    def _compartment(self, record: CompartmentRecord) -> Compartment:
        key = artifact_key(record)
        if (hit := self._compartments.get(key)) is not None:
            return hit.module
        files = self._files(record.compartment_id, record)
        checkout, path = self._checkout(record.compartment_id, files)
        try:
            module = Compartment.load(path, device=self.device, expected_sha256=_without_manifest(files))
        except BaseException:
            checkout.close()
            raise
        self._compartments[key] = _Loaded(module, checkout)
        self._count("compartment")
        return module

    def _router(self, record: RouterRecord) -> Router:
        key = artifact_key(record)
        if (hit := self._routers.get(key)) is not None:
            return hit.module
        files = self._files(f"router {record.router_id}", record)
        checkout, path = self._checkout(f"router {record.router_id}", files)
        try:
            module, _ = load_router(path, device=self.device, expected_sha256=_without_manifest(files))
        except BaseException:
            checkout.close()
            raise
        self._routers[key] = _Loaded(module, checkout)
        self._count("router")
        return module

    def _count(self, kind: str) -> None:
        self.loads[kind] += 1
        if self._metrics is not None:
            self._metrics.artifact_loads.labels(kind=kind).inc()

    def _files(self, what: str, record: CompartmentRecord | RouterRecord) -> dict[str, StoredFile]:
        """The artifact's files as the cache fetches them: the record's ``files``, or its local directory."""
        if record.files:
            files = {rel: StoredFile(f.uri, f.sha256, f.size) for rel, f in record.files.items()}
            contradicting = sorted(
                rel for rel, digest in record.sha256.items() if rel in files and files[rel].sha256 != digest
            )
            missing = sorted(rel for rel in record.sha256 if rel not in files)
            if contradicting or missing:
                raise IntegrityError(
                    f"{what}: the registry record contradicts itself: sha256 and files differ for {contradicting} "
                    f"and files lacks {missing}; re-register the artifact"
                )
            return files
        return self._legacy_files(what, record)

    def _legacy_files(self, what: str, record: CompartmentRecord | RouterRecord) -> dict[str, StoredFile]:
        """Files of a record without ``files``: its ``file://`` directory, which must lie in the local store."""
        store = self.cache.store
        if not record.artifact_uri or not record.sha256:
            raise StoreError(f"{what}: the registry records neither files nor an artifact_uri with sha256s")
        if not isinstance(store, DirectoryStore):
            raise StoreError(
                f"{what}: the record has no files map, only the local artifact_uri {record.artifact_uri!r}, which a "
                f"sampler on {store.root_url} cannot read; re-register it with files uploaded to the store"
            )
        try:
            prefix = store.key_of(record.artifact_uri)
        except StoreError as exc:
            raise StoreError(
                f"{what}: refusing artifact_uri {record.artifact_uri!r}: it is outside the artifact store "
                f"{store.root_url} ({exc}); only artifacts in the configured store are loaded"
            ) from None
        files = {}
        for rel in sorted({*record.sha256, MANIFEST}):
            uri = store.url(f"{prefix}/{rel}")
            path = file_url_path(uri)
            try:
                if rel == MANIFEST:  # not in the recorded sha256s: Compartment.load checks its list against them
                    digest, size = sha256_file_size(path)
                else:
                    digest, size = record.sha256[rel], path.stat().st_size
            except FileNotFoundError:
                raise StoreError(f"{what}: {uri} is missing; the artifact is incomplete or was deleted") from None
            files[rel] = StoredFile(uri, digest, size)
        return files

    def _checkout(self, what: str, files: Mapping[str, StoredFile]) -> tuple[Checkout, Path]:
        """Fetch, verify and pin ``files``; the directory to load them from, checked to lie inside the cache."""
        big = sorted(rel for rel, f in files.items() if rel.endswith(".json") and f.size > MAX_JSON_BYTES)
        if big:
            raise StoreError(f"{what}: {big} are recorded larger than {MAX_JSON_BYTES} bytes; refusing to read them")
        checkout = self.cache.checkout(files)
        try:
            path = self.cache.resolve(checkout.path)
            for rel in files:
                self.cache.resolve(path / rel)  # PathOutsideCacheError if a link leads out of the cache
        except BaseException:
            checkout.close()
            raise
        return checkout, path


def _without_manifest(files: Mapping[str, StoredFile]) -> dict[str, str]:
    """The sha256s an artifact's manifest lists (every file but the manifest itself)."""
    return {rel: f.sha256 for rel, f in files.items() if rel != MANIFEST}


def _source_of(compartment_id: str) -> str:
    return compartment_id.rsplit("@", 1)[0]


def load_live_composition(
    redis: RedisConfig,
    artifacts: ArtifactsConfig,
    *,
    url: str | None = None,
    default_dir: Path | None = None,
    base_dir: Path | None = None,
    device: str = "cpu",
    vectorize: Vectorize = "auto",
) -> tuple[Composed, ModelConfig]:
    """One-shot: the registry's current composition, less what tombstones forbid (``cdm sample --redis``, the demo).

    Args:
        redis: the registry's ``[redis]`` settings (namespace, timeouts, credentials).
        artifacts: the ``[artifacts]`` section: where artifacts are fetched from, and the local cache.
        url: a registry URL replacing ``redis.url``.
        default_dir: the local artifact directory used as the store when ``artifacts.url`` is "".
        base_dir: where a relative ``artifacts.cache_dir`` lies (default: the working directory).
        device: where the compartments and the router are loaded.
        vectorize: how the composition evaluates its compartments (``[sample] vectorize``).
    """
    client = connect(redis, url=url)
    try:
        reader = RegistryClient(client, Keys(redis.namespace))
        snap = reader.snapshot()
        serving = serving_snapshot(snap, reader.tombstones(also=(c.source for c in snap.compartments)))
    finally:
        client.close()
    loader = CompositionLoader.from_config(
        artifacts, default_dir=default_dir, base_dir=base_dir, device=device, vectorize=vectorize
    )
    try:
        comp = loader.build(serving.snapshot)
    finally:
        loader.close()  # the modules are in memory; nothing needs the cached files pinned any more
    if comp is None:
        refused = f"; refused as forgotten: {dict(serving.refused)}" if serving.refused else ""
        if snap.routing.value == "heads" and snap.compartments and not refused:
            refused = (
                "; none of the active compartments carries a router head (they were trained under another [router] "
                'kind): retrain them under kind "heads" (forget-source, then push again) or switch the kind back'
            )
        raise CdmError(
            f"the registry at {redact_url(url or redis.url)} serves nothing yet (epoch {snap.epoch}, "
            f"{len(snap.compartments)} active compartment(s), routing {snap.routing.value}, router "
            + ("present" if snap.router else "missing")
            + f"){refused}; push a source first"
        )
    return comp.denoiser, comp.model_config
