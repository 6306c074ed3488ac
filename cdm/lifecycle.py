"""Train and forget as explicit plans of idempotent steps: the ONE lifecycle of the offline store and the daemon.

The backends are injected: a :class:`Catalogue` says what is registered (the Redis registry in the daemon,
``daemon.catalogue``; a JSON file offline, ``cdm.store.LocalCatalogue``) and an ``ArtifactStore`` (cdm.artifacts:
``file://`` or ``s3://``) holds every artifact under fixed keys::

    compartments/<id>/...           a compartment (diffusers unet + manifest); id = "<source>@v<n>"
    compartments/<id>/slices/<j>/   ([train] slices > 1) the checkpoint after slice j, listed with its sha256 in the
                                    manifest, not in the catalogue's files (samplers never fetch it)
    routers/<id>/...                a learnt router; id = "r<unix s>-<8 hex>"
    data/<source>/<fingerprint>.npz the kept copy of a source's data (forget-samples and the learnt router train on it)

Local scratch lives under ``work_root``: ``work/<source>-<fp[:16]>/`` (resumable training checkpoints, matched
exactly, never by a glob) and ``out/<id>/`` (an artifact saved before it is uploaded).

Train plan (:meth:`Lifecycle.train`), idempotent through the catalogue (one record per data fingerprint):

    1. begin     ``begin_training`` (the same data is never trained twice; an active record ends the plan)
    2. keep      the data copy (skipped when present)
    3. train     resumable; a stop request raises TrainingInterrupted (a rerun resumes from the checkpoint); under
                 the "heads" routing kind the compartment's router head is trained next, on the same data, and saved
                 in the compartment's artifact (``head.json`` + ``head.safetensors``)
    4. upload    the slice checkpoints, then save locally and ``upload_directory`` to ``compartments/<id>/``
    5. activate  with the uploaded files, after re-checking the source's tombstone

A train plan that finds its data forgotten (the tombstone checked at 1 and 5: a forget that landed while it
trained, on any replica) raises SourceForgotten after :meth:`Lifecycle.discard` deleted what it made: the
checkpoints, the local and uploaded artifact and the data copy (the forget's own delete step ran before they existed).

Forget plans (:meth:`Lifecycle.forget_source`, :meth:`Lifecycle.forget_samples`) are journaled by request id in
the catalogue and run the steps of :data:`FORGET_STEPS` in order, each idempotent, the journal saved after each::

    plan     what is forgotten: old compartment ids, router, fingerprint; forget-samples decides its mode here:
             no sample matches -> a no-op; every sample -> the whole source; else -> retrain without them
    retire   (whole source) retire + tombstone + scrub, one catalogue transaction
    keep     (samples) the kept data under a new key
    train    (samples) the train plan on the kept data: the new version is activated, replacing the old one. With
             SISA slices it starts from the old version's checkpoint before the first slice holding a forgotten
             sample (copied, verified, under the new id); the slices from there on are retrained without them
    scrub    (samples) the old version's fingerprint and lineage
    router   (learnt routers only) retrain without the forgotten data and activate it (or clear the router)
    delete   every old artifact: compartments (with their slice checkpoints), data copies, older routers, local
             checkpoints and copies
    receipt  the ONE receipt of the request, written once, listing every deleted URI and the untouched compartments

New artifacts are built and activated before old ones are deleted, and nothing active is ever deleted. A crash
or SIGTERM at any step leaves the journal at the last completed step: running the same request again finishes
it; a request whose journal is complete returns its receipt without doing anything again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from cdm.artifacts import (
    MANIFEST,
    ArtifactStore,
    StoredFile,
    check_key,
    remove_tree,
    sha256_bytes,
    sha256_file,
    upload_directory,
)
from cdm.compartment import WEIGHTS, CompartmentManifest
from cdm.config import ModelConfig, RouterConfig, RoutingKind, TrainConfig, to_dict
from cdm.data import SourceData, fingerprint, load_npz_bytes, npz_bytes
from cdm.errors import CdmError, IntegrityError, SourceForgotten, StoreError, TrainingInterrupted
from cdm.routing import ROUTING_KINDS, RouterResult, save_router, train_head, train_router
from cdm.routing import WEIGHTS as ROUTER_WEIGHTS
from cdm.training import SLICES_DIR, SlicePlan, TrainResult, checkpoint_files, slice_of, train_compartment
from common.names import SOURCE_NAME_PATTERN

log = logging.getLogger(__name__)

RouterKind = RoutingKind  # "learnt" | "density" | "heads"
Status = Literal["training", "active", "retired"]
ForgetKind = Literal["forget-source", "forget-samples"]
# plan.mode: what the request turned out to be once planned
Mode = Literal["", "source", "samples", "noop", "superseded"]
FORGET_STEPS: tuple[str, ...] = ("plan", "retire", "keep", "train", "scrub", "router", "delete", "receipt")
MAX_UNMATCHED_LISTED = 1000  # unmatched sample ids named in a receipt (the count is always exact)

_SOURCE = SOURCE_NAME_PATTERN
_COMPARTMENT_ID = re.compile(rf"(?:{SOURCE_NAME_PATTERN.pattern})@v[1-9][0-9]*")
_ROUTER_ID = re.compile(r"r[0-9]{1,12}-[0-9a-f]{8}")
_FINGERPRINT = re.compile(r"[0-9a-f]{64}")
_HEX16 = re.compile(r"[0-9a-f]{16}")


# --------------------------------------------------------------------------------------------- artifact keys


def _checked(pattern: re.Pattern[str], what: str, value: str) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise StoreError(f"{what} {value!r} is malformed; refusing to turn it into an artifact key")
    return value


def compartment_prefix(compartment_id: str) -> str:
    """The store key prefix of a compartment's artifact."""
    return f"compartments/{_checked(_COMPARTMENT_ID, 'compartment id', compartment_id)}"


def router_prefix(router_id: str) -> str:
    """The store key prefix of a router's artifact."""
    return f"routers/{_checked(_ROUTER_ID, 'router id', router_id)}"


def data_prefix(source: str) -> str:
    """The key prefix of every kept data copy of ``source`` (exact: ``data/shoes`` is not ``data/shoes-v2``)."""
    return f"data/{_checked(_SOURCE, 'source', source)}"


def data_key(source: str, fp: str) -> str:
    """The key of the kept copy of ``source``'s data with fingerprint ``fp``."""
    return f"{data_prefix(source)}/{_checked(_FINGERPRINT, 'fingerprint', fp)}.npz"


def legacy_data_key(source: str) -> str:
    """Where daemons before the shared lifecycle kept a source's data (read when present, deleted by a forget)."""
    return f"{data_prefix(source)}.npz"


def work_dir(work_root: Path, source: str, fp: str) -> Path:
    """The resumable-checkpoint directory of training ``source`` on data ``fp``."""
    return Path(work_root) / "work" / f"{_checked(_SOURCE, 'source', source)}-{fp[:16]}"


def work_dirs(work_root: Path, source: str) -> list[Path]:
    """Every checkpoint directory of ``source`` (an exact name match: ``shoes`` never matches ``shoes-v2-...``)."""
    root = Path(work_root) / "work"
    if not root.is_dir():
        return []
    head = f"{_checked(_SOURCE, 'source', source)}-"
    return sorted(p for p in root.iterdir() if p.name.startswith(head) and _HEX16.fullmatch(p.name[len(head) :]))


def source_of(compartment_id: str) -> str:
    return compartment_id.rsplit("@", 1)[0]


# --------------------------------------------------------------------------------------------- catalogue records


@dataclass(frozen=True)
class Entry:
    """One compartment as a catalogue records it."""

    compartment_id: str  # "<source>@v<n>"
    source: str
    status: Status
    fingerprint: str = ""  # "" once scrubbed (its data was forgotten)
    n_samples: int = 0
    files: Mapping[str, StoredFile] = field(default_factory=dict)  # relative path -> StoredFile (once active)
    lineage: Mapping[str, Any] = field(default_factory=dict)
    prior: float = 0.0

    @property
    def weights_sha256(self) -> str:
        f = self.files.get(WEIGHTS)
        return f.sha256 if f is not None else ""


@dataclass(frozen=True)
class RouterEntry:
    """The active learnt router as a catalogue records it."""

    router_id: str
    compartment_ids: tuple[str, ...]  # its logit order
    files: Mapping[str, StoredFile] = field(default_factory=dict)
    artifact_uri: str = ""
    trained_at_epoch: int = 0
    metrics: Mapping[str, Any] = field(default_factory=dict)

    @property
    def weights_sha256(self) -> str:
        f = self.files.get(ROUTER_WEIGHTS)
        return f.sha256 if f is not None else ""


@dataclass(frozen=True)
class Tombstone:
    """A forgotten source: data of it from before ``forgotten_at`` is never trained or served again."""

    source: str
    forgotten_at: float  # unix seconds
    request_id: str
    epoch: int = 0
    through: Mapping[str, int] = field(default_factory=dict)  # "topic:partition" -> last forgotten offset
    files_sha256: tuple[str, ...] = ()
    compartment_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class ForgetReceipt:
    """Proof of what one forgetting request did: written once per request, only when it is complete."""

    request_id: str
    kind: ForgetKind  # what was asked
    source: str
    outcome: str  # "forgotten" | "samples-forgotten" | "no-match" | "unknown-source" | "superseded"
    detail: str  # one sentence saying what happened
    n_samples_removed: int
    fingerprint: str  # the data forgotten from ("" when nothing was found)
    new_fingerprint: str | None  # forget-samples: the data the new compartment is trained on
    retired: tuple[str, ...]  # compartment ids taken out of the composition
    new_compartment: str | None  # forget-samples: the retrained compartment
    deleted_files: tuple[str, ...]  # URIs of every deleted file or object
    untouched: dict[str, str]  # every other active compartment id -> sha256 of its weights (unchanged)
    router_before: str | None
    router_after: str | None
    router_sha256_before: str | None
    router_sha256_after: str | None
    unmatched_ids: tuple[int, ...] = ()  # forget-samples: requested ids the source does not hold (first 1000)
    n_unmatched: int = 0
    epoch: int | None = None  # catalogue epoch of the retire (whole-source forgets)
    started_at: float = 0.0
    completed_at: float = 0.0
    seconds: float = 0.0
    # forget-samples that retrained a compartment (None otherwise): its SISA slices ([train] slices), the slice whose
    # checkpoint the retrain started from (0: from scratch), that checkpoint's step, and the steps trained after it
    slices: int | None = None
    resumed_from_slice: int | None = None
    resumed_from_step: int | None = None
    steps_retrained: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> ForgetReceipt:
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in doc.items() if k in names}
        for name in ("retired", "deleted_files", "unmatched_ids"):
            kw[name] = tuple(kw.get(name, ()))
        return cls(**kw)


class Catalogue(Protocol):
    """What is registered: compartments, the router, tombstones, forget journals and receipts.

    The daemon's is the Redis registry (``daemon.catalogue.RegistryCatalogue``); the offline store's a JSON file
    (``cdm.store.LocalCatalogue``). Every method is atomic on its own.
    """

    def active(self) -> list[Entry]:
        """The active compartments, sorted by id."""
        ...

    def versions(self, source: str) -> list[Entry]:
        """Every version of ``source``, any status, oldest first."""
        ...

    def router(self) -> RouterEntry | None: ...

    def begin_training(self, source: str, fingerprint: str, lineage: Mapping[str, Any]) -> Entry:
        """A training record for this data, or the existing training/active one with this fingerprint."""
        ...

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
        """Make a trained compartment active, retiring the source's previous version (one composition change)."""
        ...

    def set_router(self, router: RouterEntry, *, priors: Mapping[str, float]) -> None: ...

    def clear_router(self) -> None: ...

    def forget_source(self, source: str, *, request_id: str, files_sha256: Sequence[str]) -> Tombstone:
        """Retire every version, scrub fingerprints and lineage, write the tombstone: one transaction; the same
        request id again returns the same tombstone and changes nothing."""
        ...

    def scrub(self, compartment_id: str) -> None:
        """Clear a retired compartment's fingerprint and lineage."""
        ...

    def tombstone(self, source: str) -> Tombstone | None: ...

    def journal(self, request_id: str) -> dict[str, Any] | None: ...

    def save_journal(self, request_id: str, doc: Mapping[str, Any]) -> None: ...

    def put_receipt(self, receipt: ForgetReceipt) -> bool:
        """Store the request's receipt unless one exists (first write wins); True if written."""
        ...

    def receipt(self, request_id: str) -> ForgetReceipt | None: ...


# --------------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class TrainOutcome:
    """What :meth:`Lifecycle.train` did."""

    entry: Entry  # the active compartment of the data
    trained: bool  # False: this data was registered already (a redelivery), nothing was trained
    result: TrainResult | None  # the training run (None when nothing was trained)


@dataclass(frozen=True)
class RouterOutcome:
    entry: RouterEntry
    result: RouterResult


@dataclass
class ForgetPlan:
    """The journal of one forget request (stored as JSON in the catalogue after every step)."""

    request_id: str
    kind: ForgetKind
    source: str
    sample_ids: list[int] = field(default_factory=list)
    started_at: float = 0.0
    done: list[str] = field(default_factory=list)  # completed steps, in order
    mode: Mode = ""
    outcome: str = ""
    detail: str = ""
    old_compartments: list[str] = field(default_factory=list)  # every version being forgotten / replaced
    old_fingerprint: str = ""
    old_data_keys: list[str] = field(default_factory=list)
    files_sha256: list[str] = field(default_factory=list)
    n_removed: int = 0
    unmatched: list[int] = field(default_factory=list)
    n_unmatched: int = 0
    new_fingerprint: str = ""
    new_compartment: str = ""
    slices: int = 1  # [train] slices of the retrain
    first_slice: int = 0  # (samples) the first 1-based slice holding a forgotten sample
    resume_slice: int = 0  # (samples) planned: the slice whose checkpoint of the old version the retrain starts from
    resumed_from_slice: int | None = None  # (samples) what the retrain did, from the new compartment's manifest
    resumed_from_step: int | None = None
    steps_retrained: int | None = None
    lineage: dict[str, Any] = field(default_factory=dict)
    retired: list[str] = field(default_factory=list)
    epoch: int | None = None
    router_before: str | None = None
    router_sha256_before: str | None = None
    router_after: str | None = None
    router_sha256_after: str | None = None
    delete_uris: list[str] = field(default_factory=list)  # store objects planned for deletion
    delete_local: list[str] = field(default_factory=list)  # local paths (checkpoints) planned for deletion
    deleted: list[str] = field(default_factory=list)  # URIs deleted (store, local and the caller's local copies)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> ForgetPlan:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in doc.items() if k in names})


# --------------------------------------------------------------------------------------------- the lifecycle


class Lifecycle:
    """Training and exact forgetting over a catalogue and an artifact store.

    Args:
        catalogue: what is registered (see :class:`Catalogue`).
        store: where artifacts live (``cdm.artifacts.open_store``).
        model, train, router: the library config sections compartments and routers are built with.
        work_root: local directory for checkpoints (``work/``) and artifacts before upload (``out/``).
        router_kind: ``[router] kind``: "learnt" retrains a router after every composition change that needs it;
            "density" needs none (a forget-source is retire + delete); "heads" trains each compartment's head right
            after it, into the same artifact (a forget-samples retrains both, a forget-source is retire + delete).
        trainer_id: recorded in ``train_metrics`` (e.g. the daemon id).
        progress: show training progress bars.
        should_stop: polled during training; True checkpoints and raises TrainingInterrupted.
        on_step: ``(source, step, steps, loss)`` after every training step (status, lock refresh).
        after_step: called with the name of every completed forget step (tests inject crashes here).
        local_cleanup: deletes local copies of a forgotten source outside the store (the daemon's spool);
            returns what it deleted. Called in the delete step of a whole-source forget.
        clock: unix seconds (plan start; compared with tombstones).
    """

    def __init__(
        self,
        catalogue: Catalogue,
        store: ArtifactStore,
        *,
        model: ModelConfig,
        train: TrainConfig,
        router: RouterConfig,
        work_root: Path,
        router_kind: RouterKind = "learnt",
        trainer_id: str = "",
        progress: bool = False,
        should_stop: Callable[[], bool] | None = None,
        on_step: Callable[[str, int, int, float], None] | None = None,
        after_step: Callable[[str], None] | None = None,
        local_cleanup: Callable[[str], Sequence[str]] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if router_kind not in ROUTING_KINDS:
            raise CdmError(f"router kind {router_kind!r} is not one of {list(ROUTING_KINDS)}")
        self.catalogue = catalogue
        self.store = store
        self.model = model
        self.train_cfg = train
        self.router_cfg = router
        self.work_root = Path(work_root)
        self.router_kind: RouterKind = router_kind
        self.trainer_id = trainer_id
        self.progress = progress
        self.should_stop = should_stop
        self.on_step = on_step
        self.after_step = after_step
        self.local_cleanup = local_cleanup
        self.clock = clock

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    # ------------------------------------------------------------------------------------------- data

    def load_data(self, entry: Entry) -> SourceData:
        """The kept data copy a compartment was trained on (or the one-file copy older daemons kept,
        ``data/<source>.npz``, when its fingerprint matches)."""
        if not entry.fingerprint:
            raise StoreError(f"{entry.compartment_id} has no fingerprint (its data was forgotten); no data to load")
        key = data_key(entry.source, entry.fingerprint)
        if not self.store.exists(key) and self.store.exists(legacy_data_key(entry.source)):
            legacy = legacy_data_key(entry.source)
            data = load_npz_bytes(self.store.get_bytes(legacy), where=self.store.url(legacy))
            if fingerprint(data) == entry.fingerprint:
                return data
        return load_npz_bytes(self.store.get_bytes(key), where=self.store.url(key))

    def keep_data(self, source: str, data: SourceData, fp: str | None = None) -> str:
        """Store the data copy of ``source`` (skipped when present); returns its key."""
        key = data_key(source, fp or fingerprint(data))
        if not self.store.exists(key):
            self.store.put_bytes(key, npz_bytes(data))
        return key

    def manifest_of(self, entry: Entry) -> CompartmentManifest:
        """The manifest of a registered compartment, read from the store and checked against the catalogue's sha256."""
        key = f"{compartment_prefix(entry.compartment_id)}/{MANIFEST}"
        raw = self.store.get_bytes(key)
        recorded = entry.files.get(MANIFEST)
        if recorded is not None and sha256_bytes(raw) != recorded.sha256:
            raise IntegrityError(
                f"{self.store.url(key)} does not match the sha256 the catalogue recorded for {entry.compartment_id}; "
                "the artifact was replaced after registration"
            )
        try:
            doc = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise StoreError(f"{self.store.url(key)} is not valid JSON ({exc}); the artifact is corrupt") from exc
        return CompartmentManifest.from_dict(doc)

    # ------------------------------------------------------------------------------------------- SISA checkpoints

    def reusable_slices(self, old: CompartmentManifest, data: SourceData) -> int:
        """How many leading slices of ``old`` (an earlier version of the source) training on ``data`` can skip: the
        checkpoint after slice j is reusable when slices 1..j hold exactly the same samples, under the same
        [train] and [model] config, and every checkpoint up to it was kept. Never the last slice (it has none)."""
        if self.train_cfg.slices == 1 or old.train != to_dict(self.train_cfg) or old.model != to_dict(self.model):
            return 0
        same = SlicePlan.of(data, self.train_cfg).shared_prefix(old.slices)
        n = 0
        for rec in old.slices[: min(same, self.train_cfg.slices - 1)]:
            if not rec.checkpoint:
                break
            n = rec.index
        return n

    def _reuse_checkpoints(self, base: Entry, data: SourceData, workdir: Path) -> int:
        """Copy into ``workdir`` the checkpoints of ``base`` that training on ``data`` may start from (verified
        against its manifest); returns the last slice copied. A checkpoint that cannot be fetched or verified ends
        the copy there: training then starts earlier (from scratch at worst), never from an unverified state."""
        try:
            old = self.manifest_of(base)
        except CdmError as exc:
            log.warning("cannot read the manifest of %s (%s); retraining from scratch", base.compartment_id, exc)
            return 0
        reused = 0
        for rec in old.slices[: self.reusable_slices(old, data)]:
            try:
                if set(rec.checkpoint) != set(checkpoint_files(rec.index)):
                    raise StoreError(f"its files {sorted(rec.checkpoint)} are not the checkpoint of slice {rec.index}")
                # the JSON last: it is the checkpoint's commit point
                for rel, sha in sorted(rec.checkpoint.items(), key=lambda item: item[0].endswith(".json")):
                    self._fetch_checkpoint_file(base.compartment_id, rel, sha, workdir)
            except CdmError as exc:
                log.warning("checkpoint after slice %d of %s is unusable: %s", rec.index, base.compartment_id, exc)
                remove_tree(workdir / SLICES_DIR / str(rec.index))
                break
            reused = rec.index
        return reused

    def _fetch_checkpoint_file(self, compartment_id: str, rel: str, sha256: str, workdir: Path) -> None:
        target = workdir / check_key(rel)
        if target.is_file() and sha256_file(target) == sha256:
            return  # copied before an interruption
        self.store.get_file(f"{compartment_prefix(compartment_id)}/{rel}", target)
        if sha256_file(target) != sha256:
            target.unlink()
            raise IntegrityError(f"{compartment_id}/{rel} does not match the sha256 its manifest records")

    def _upload_checkpoints(self, compartment_id: str, manifest: CompartmentManifest, workdir: Path) -> None:
        """Upload the slice checkpoints a manifest lists, beside the compartment (checked against their sha256)."""
        for rec in manifest.slices:
            for rel, sha in sorted(rec.checkpoint.items()):
                path = workdir / check_key(rel)
                if sha256_file(path) != sha:
                    raise IntegrityError(f"{path} changed after training recorded its sha256; retrain {compartment_id}")
                self.store.put_file(f"{compartment_prefix(compartment_id)}/{rel}", path)

    # ------------------------------------------------------------------------------------------- training

    def train(
        self,
        source: str,
        data: SourceData,
        *,
        lineage: Mapping[str, Any],
        is_stale: Callable[[Tombstone], bool] | None = None,
        base: Entry | None = None,
    ) -> TrainOutcome:
        """The train plan: register, keep, train (resumable), upload, activate; idempotent per data fingerprint.

        Args:
            source: the source name.
            data: all of its data.
            lineage: JSON-able origin of the data (recorded with the compartment).
            is_stale: given the source's tombstone, True when ``data`` predates it (then nothing is trained and
                SourceForgotten is raised). Checked before registering and again before activating.
            base: an earlier version of the source whose SISA checkpoints training may start from (the ones after
                leading slices that hold exactly the same samples in ``data``); they are copied under the new id.

        Raises TrainingInterrupted when ``should_stop`` stopped it (a rerun resumes), SourceForgotten.
        """
        fp = fingerprint(data)
        # 1. begin (the same data is never trained twice)
        self._check_tombstone(source, is_stale, discard=(fp, None))
        entry = self.catalogue.begin_training(source, fp, lineage)
        if entry.status == "active":
            log.info("%s (fingerprint %s) is already registered as %s", source, fp[:12], entry.compartment_id)
            return TrainOutcome(entry, False, None)
        cid = entry.compartment_id
        # 2. keep the data copy
        self.keep_data(source, data, fp)
        # 3. train, resuming from the checkpoint of an interrupted run or a reusable slice checkpoint of ``base``
        workdir = work_dir(self.work_root, source, fp)
        reused = self._reuse_checkpoints(base, data, workdir) if base is not None else 0
        steps = self.train_cfg.steps
        on_step = None
        if self.on_step is not None:
            callback = self.on_step

            def on_step(step: int, loss: float) -> None:
                callback(source, step, steps, loss)

        log.info("training %s on %d samples (%d steps)", cid, len(data), steps)
        result = train_compartment(
            source,
            data,
            model=self.model,
            train=self.train_cfg,
            num_classes=self.num_classes,
            workdir=workdir,
            progress=self.progress,
            should_stop=self.should_stop,
            on_step=on_step,
        )
        if result.compartment is None:
            raise TrainingInterrupted(f"training of {cid} stopped at step {result.steps}; a rerun resumes it")
        if self.router_kind == "heads":  # 3b. its router head, on the same data alone, into the same artifact
            result.compartment.head = train_head(
                source,
                data,
                model=self.model,
                router=self.router_cfg,
                num_classes=self.num_classes,
                progress=self.progress,
                should_stop=self.should_stop,
                workdir=workdir / "head",
            )
        if base is not None and 0 < result.base_slice <= reused:
            result.compartment.manifest = dataclasses.replace(
                result.compartment.manifest, base_compartment=base.compartment_id
            )
        # 4. upload the slice checkpoints, save locally, upload the compartment (its manifest last)
        self._upload_checkpoints(cid, result.compartment.manifest, workdir)
        out = self.work_root / "out" / cid
        manifest = result.compartment.save(out)
        files = upload_directory(self.store, out, compartment_prefix(cid))
        # 5. activate (unless the source was forgotten meanwhile: then nothing of this run is kept)
        self._check_tombstone(source, is_stale, discard=(fp, cid))
        others = sum(e.n_samples for e in self.catalogue.active() if e.source != source)
        active = self.catalogue.activate(
            cid,
            artifact_uri=self.store.url(compartment_prefix(cid)) + "/",
            files=files,
            prior=len(data) / max(1, len(data) + others),
            class_counts=manifest.class_counts,
            n_samples=len(data),
            train_metrics={
                "final_loss": result.final_loss,
                "steps": result.steps,
                "seconds": result.seconds,
                "resumed_from": result.resumed_from,
                "base_slice": result.base_slice,
                "daemon_id": self.trainer_id,
            },
        )
        if active.status != "active":
            log.warning("%s was not activated (%s): a newer version of %s is active", cid, active.status, source)
        remove_tree(out)
        remove_tree(workdir)
        return TrainOutcome(active, True, result)

    def _check_tombstone(
        self, source: str, is_stale: Callable[[Tombstone], bool] | None, *, discard: tuple[str, str | None]
    ) -> None:
        """SourceForgotten (after discarding what a training of ``discard`` = (fingerprint, compartment id) left)
        when the source's tombstone says this data was forgotten."""
        if is_stale is None:
            return
        tomb = self.catalogue.tombstone(source)
        if tomb is not None and is_stale(tomb):
            deleted = self.discard(source, *discard)
            raise SourceForgotten(
                f"{source} was forgotten by request {tomb.request_id!r} at {tomb.forgotten_at:.3f}, after this data "
                f"arrived; it is not trained (push it again to train it as a new source); {len(deleted)} file(s) of "
                "its training deleted"
            )

    def discard(self, source: str, fp: str, compartment_id: str | None = None) -> list[str]:
        """Delete what training ``source`` on the data of fingerprint ``fp`` left behind, once that data is known
        forgotten: its checkpoints, the local and uploaded copies of its compartment ``compartment_id`` (never an
        active one) and its data copy (unless another live version of ``source`` has this fingerprint).

        Returns the URIs deleted. A forget's own delete step runs on the replica that forgets and before a training
        elsewhere has finished: this is the training replica's half.
        """
        deleted = [Path(f).as_uri() for f in remove_tree(work_dir(self.work_root, source, fp))]
        versions = self.catalogue.versions(source)
        if compartment_id:
            deleted += [Path(f).as_uri() for f in remove_tree(self.work_root / "out" / compartment_id)]
            if not any(v.compartment_id == compartment_id and v.status == "active" for v in versions):
                deleted += self.store.delete(compartment_prefix(compartment_id), recursive=True)
        live = any(
            v.fingerprint == fp and v.status in ("active", "training")
            for v in versions
            if v.compartment_id != compartment_id
        )
        if not live:
            deleted += self.store.delete(data_key(source, fp))
        if deleted:
            log.info("discarded %d file(s) of a training of forgotten data of %s: %s", len(deleted), source, deleted)
        return deleted

    def retrain_router(self, *, router_id: str | None = None) -> RouterOutcome | None:
        """Train a learnt router over the active compartments' kept data and activate it.

        With no active compartment the router is cleared (None). With ``router_kind = "density"`` there is no
        router to train (None). Raises TrainingInterrupted when stopped (nothing is activated).
        """
        if self.router_kind != "learnt":
            return None
        entries = self.catalogue.active()
        if not entries:
            self.catalogue.clear_router()
            return None
        datasets = {e.compartment_id: self.load_data(e) for e in entries}
        result = train_router(
            datasets,
            model=self.model,
            router=self.router_cfg,
            num_classes=self.num_classes,
            progress=self.progress,
            should_stop=self.should_stop,
        )
        if self.should_stop is not None and self.should_stop():
            raise TrainingInterrupted("router training was stopped; nothing was activated")
        rid = router_id or new_router_id(self.clock())
        out = self.work_root / "out" / rid
        manifest = save_router(result.router, result.manifest, out)
        files = upload_directory(self.store, out, router_prefix(rid))
        entry = RouterEntry(
            router_id=rid,
            compartment_ids=tuple(datasets),
            files=files,
            artifact_uri=self.store.url(router_prefix(rid)) + "/",
            metrics={
                "accuracy": result.report.accuracy,
                "ece": result.report.ece,
                "accuracy_by_noise": result.report.accuracy_by_noise,
                "seconds": result.report.train_seconds,
            },
        )
        total = sum(e.n_samples for e in entries)
        self.catalogue.set_router(entry, priors={e.compartment_id: e.n_samples / max(1, total) for e in entries})
        remove_tree(out)
        return RouterOutcome(entry, dataclasses.replace(result, manifest=manifest))

    # ------------------------------------------------------------------------------------------- forgetting

    def forget_source(self, source: str, *, request_id: str) -> ForgetReceipt:
        """Exact forgetting of a whole source (see the module docstring for the steps)."""
        return self._forget(ForgetPlan(request_id, "forget-source", _checked(_SOURCE, "source", source)))

    def forget_samples(self, source: str, sample_ids: Sequence[int], *, request_id: str) -> ForgetReceipt:
        """Exact forgetting of some samples of a source: only that source's compartment is retrained."""
        ids = sorted({int(i) for i in sample_ids})
        return self._forget(ForgetPlan(request_id, "forget-samples", _checked(_SOURCE, "source", source), ids))

    def _forget(self, new: ForgetPlan) -> ForgetReceipt:
        if not new.request_id:
            raise CdmError("a forget request needs a request id (its journal and receipt are keyed by it)")
        stored = self.catalogue.receipt(new.request_id)
        doc = self.catalogue.journal(new.request_id)
        plan = ForgetPlan.from_dict(doc) if doc is not None else new
        if (plan.kind, plan.source, plan.sample_ids) != (new.kind, new.source, new.sample_ids):
            raise CdmError(
                f"request id {new.request_id!r} was used for {plan.kind} of {plan.source!r} "
                f"({len(plan.sample_ids)} ids); this request is {new.kind} of {new.source!r}: use a new request id"
            )
        if stored is not None and (doc is None or "receipt" in plan.done):
            log.info("forget request %s is complete already; acknowledging it again", new.request_id)
            return stored
        if doc is None:
            plan.started_at = self.clock()
        steps: dict[str, Callable[[ForgetPlan], None]] = {
            "plan": self._step_plan,
            "retire": self._step_retire,
            "keep": self._step_keep,
            "train": self._step_train,
            "scrub": self._step_scrub,
            "router": self._step_router,
            "delete": self._step_delete,
            "receipt": self._step_receipt,
        }
        for name in FORGET_STEPS:
            if name in plan.done:
                continue
            steps[name](plan)
            plan.done.append(name)
            self.catalogue.save_journal(plan.request_id, plan.to_dict())
            if self.after_step is not None:
                self.after_step(name)
        receipt = self.catalogue.receipt(plan.request_id)
        assert receipt is not None, "the receipt step writes it"
        return receipt

    # -- steps (each one idempotent: it may run again after a crash before the journal recorded it)

    def _step_plan(self, plan: ForgetPlan) -> None:
        router = self.catalogue.router()
        plan.router_before = router.router_id if router else None
        plan.router_sha256_before = router.weights_sha256 if router else None
        if plan.kind == "forget-samples":
            self._plan_samples(plan)
        else:
            self._plan_source(plan)

    def _plan_source(self, plan: ForgetPlan) -> None:
        versions = self.catalogue.versions(plan.source)
        current = next((v for v in reversed(versions) if v.status == "active"), None)
        plan.mode = "source"
        plan.old_compartments = [v.compartment_id for v in versions]
        plan.old_fingerprint = current.fingerprint if current else next((v.fingerprint for v in versions[::-1]), "")
        plan.n_removed = current.n_samples if current else 0
        plan.files_sha256 = sorted({f.sha256 for v in versions for f in v.files.values()})
        plan.old_data_keys = [data_key(plan.source, v.fingerprint) for v in versions if v.fingerprint]
        if plan.kind == "forget-samples":
            plan.outcome = "forgotten"
            plan.detail = f"every requested sample matched: all {plan.n_removed} samples, the whole source, forgotten"
        elif versions:
            plan.outcome = "forgotten"
            plan.detail = f"{len(versions)} version(s) of {plan.source} forgotten"
        else:
            plan.outcome = "forgotten"
            plan.detail = (
                f"{plan.source} has no registered compartment; its tombstone keeps staged copies from training"
            )

    def _plan_samples(self, plan: ForgetPlan) -> None:
        versions = self.catalogue.versions(plan.source)
        current = next((v for v in reversed(versions) if v.status == "active"), None)
        if current is None:
            if any(v.status == "training" for v in versions):
                raise CdmError(
                    f"forget-samples: {plan.source} is still being trained; the request is retried once it is active"
                )
            plan.mode, plan.outcome = "noop", "unknown-source"
            plan.detail = f"{plan.source} has no active compartment; nothing was changed"
            return
        data = self.load_data(current)
        drop = np.isin(data.ids, np.asarray(plan.sample_ids, dtype=np.int64))
        matched = {int(i) for i in data.ids[drop]}
        unmatched = [i for i in plan.sample_ids if i not in matched]
        plan.unmatched, plan.n_unmatched = unmatched[:MAX_UNMATCHED_LISTED], len(unmatched)
        plan.old_fingerprint = current.fingerprint
        if not drop.any():
            plan.mode, plan.outcome = "noop", "no-match"
            plan.detail = (
                f"none of the {len(plan.sample_ids)} requested ids is a sample of {plan.source}; nothing changed"
            )
            return
        if drop.all():
            self._plan_source(plan)
            return
        kept = data.subset(~drop)
        plan.mode, plan.outcome = "samples", "samples-forgotten"
        plan.old_compartments = [current.compartment_id]
        plan.old_data_keys = [data_key(plan.source, current.fingerprint), legacy_data_key(plan.source)]
        plan.files_sha256 = sorted(f.sha256 for f in current.files.values())
        plan.n_removed = int(drop.sum())
        plan.new_fingerprint = fingerprint(kept)
        plan.lineage = dict(current.lineage)
        plan.lineage["forget_samples"] = {"request_id": plan.request_id, "removed": plan.n_removed}
        plan.slices = self.train_cfg.slices
        plan.first_slice = int(slice_of(data.ids[drop], plan.slices).min()) + 1
        try:
            plan.resume_slice = self.reusable_slices(self.manifest_of(current), kept)
        except CdmError as exc:
            log.warning(
                "forget %s: the checkpoints of %s are unusable (%s)", plan.request_id, current.compartment_id, exc
            )
        plan.detail = f"{plan.n_removed} sample(s) of {plan.source} forgotten; its compartment retrained without them"
        if plan.resume_slice:
            start = SlicePlan.of(kept, self.train_cfg).start(plan.resume_slice + 1)
            plan.detail += (
                f" from the checkpoint after slice {plan.resume_slice} of {plan.slices} "
                f"({self.train_cfg.steps - start} of {self.train_cfg.steps} steps)"
            )

    def _step_retire(self, plan: ForgetPlan) -> None:
        if plan.mode != "source":
            return
        tomb = self.catalogue.forget_source(plan.source, request_id=plan.request_id, files_sha256=plan.files_sha256)
        plan.retired, plan.epoch = list(tomb.compartment_ids), tomb.epoch

    def _kept_data(self, plan: ForgetPlan) -> SourceData:
        old = next(e for e in self.catalogue.versions(plan.source) if e.compartment_id == plan.old_compartments[0])
        if old.fingerprint != plan.old_fingerprint:
            raise StoreError(f"{old.compartment_id} no longer has fingerprint {plan.old_fingerprint[:12]}")
        data = self.load_data(old)
        return data.subset(~np.isin(data.ids, np.asarray(plan.sample_ids, dtype=np.int64)))

    def _step_keep(self, plan: ForgetPlan) -> None:
        if plan.mode != "samples" or self.store.exists(data_key(plan.source, plan.new_fingerprint)):
            return
        kept = self._kept_data(plan)
        if fingerprint(kept) != plan.new_fingerprint:
            raise StoreError(f"the kept data of {plan.source} no longer has the planned fingerprint")
        self.keep_data(plan.source, kept, plan.new_fingerprint)

    def _forgotten_since_start(self, plan: ForgetPlan) -> Tombstone | None:
        tomb = self.catalogue.tombstone(plan.source)
        if tomb is not None and tomb.request_id != plan.request_id and tomb.forgotten_at >= plan.started_at:
            return tomb
        return None

    def _step_train(self, plan: ForgetPlan) -> None:
        if plan.mode != "samples":
            return
        tomb = self._forgotten_since_start(plan)
        if tomb is None:
            key = data_key(plan.source, plan.new_fingerprint)
            kept = load_npz_bytes(self.store.get_bytes(key), where=self.store.url(key))
            old = next(e for e in self.catalogue.versions(plan.source) if e.compartment_id == plan.old_compartments[0])
            try:
                outcome = self.train(
                    plan.source,
                    kept,
                    lineage=plan.lineage,
                    is_stale=lambda t: t.request_id != plan.request_id and t.forgotten_at >= plan.started_at,
                    base=old if plan.resume_slice else None,
                )
            except SourceForgotten:
                tomb = self._forgotten_since_start(plan)
            else:
                if outcome.entry.compartment_id in plan.old_compartments:
                    raise StoreError(f"retraining {plan.source} returned the old {outcome.entry.compartment_id}")
                plan.new_compartment = outcome.entry.compartment_id
                # what the retrain did (also when it was done before a crash): the new compartment's manifest says
                manifest = self.manifest_of(outcome.entry)
                if manifest.base_slice >= plan.first_slice:
                    raise StoreError(
                        f"{outcome.entry.compartment_id} started from slice {manifest.base_slice}, at or after the "
                        f"first slice ({plan.first_slice}) holding a forgotten sample"
                    )
                plan.resumed_from_slice, plan.resumed_from_step = manifest.base_slice, manifest.base_step
                plan.steps_retrained = manifest.steps - manifest.base_step
                return
        assert tomb is not None
        plan.mode, plan.outcome = "superseded", "superseded"
        plan.detail = f"{plan.source} was forgotten whole by request {tomb.request_id!r} while this request ran"

    def _step_scrub(self, plan: ForgetPlan) -> None:
        if plan.mode != "samples":
            return
        for cid in plan.old_compartments:
            self.catalogue.scrub(cid)
        plan.retired = list(plan.old_compartments)

    def _step_router(self, plan: ForgetPlan) -> None:
        if plan.mode not in ("source", "samples"):
            return
        current = self.catalogue.router()
        if self.router_kind != "learnt":
            if current is not None and set(current.compartment_ids) & set(plan.old_compartments):
                self.catalogue.clear_router()  # a learnt router left from before saw the forgotten data
            return
        if plan.router_after is not None and current is not None and current.router_id == plan.router_after:
            return  # activated before a crash
        if current is None or not set(current.compartment_ids) & set(plan.old_compartments):
            plan.router_after, plan.router_sha256_after = plan.router_before, plan.router_sha256_before
            return  # the router never saw the forgotten data
        plan.router_after = request_router_id(plan.request_id, plan.started_at)
        self.catalogue.save_journal(plan.request_id, plan.to_dict())  # the intent, so a rerun deletes a half upload
        outcome = self.retrain_router(router_id=plan.router_after)
        if outcome is None:
            plan.router_after, plan.router_sha256_after = None, None
        else:
            plan.router_sha256_after = outcome.entry.weights_sha256

    def _step_delete(self, plan: ForgetPlan) -> None:
        if plan.mode == "noop":
            return
        # 1. what to delete: every old artifact, never an active one
        active = {e.compartment_id for e in self.catalogue.active()}
        router = self.catalogue.router()
        keep_router = router.router_id if router else None
        keys: set[str] = set()
        for cid in plan.old_compartments:
            if cid in active:
                log.error("forget %s: %s is active; it is not deleted", plan.request_id, cid)
                continue
            keys.update(self.store.list(compartment_prefix(cid)))
        if plan.mode == "superseded" and plan.new_compartment and plan.new_compartment not in active:
            keys.update(self.store.list(compartment_prefix(plan.new_compartment)))
        if plan.mode in ("source", "superseded"):
            keys.update(self.store.list(data_prefix(plan.source)))
            if self.store.exists(legacy_data_key(plan.source)):
                keys.add(legacy_data_key(plan.source))
        else:
            new_key = data_key(plan.source, plan.new_fingerprint) if plan.new_fingerprint else ""
            keys.update(k for k in plan.old_data_keys if k != new_key and self.store.exists(k))
        keys.update(
            k for k in self.store.list("routers") if keep_router is None or not _in(k, router_prefix(keep_router))
        )
        uris = {self.store.url(k) for k in keys}
        uris.update(plan.delete_uris)
        local: set[str] = set(plan.delete_local)
        if plan.mode in ("source", "superseded"):
            local.update(str(p) for p in work_dirs(self.work_root, plan.source))
        elif plan.old_fingerprint:
            local.add(str(work_dir(self.work_root, plan.source, plan.old_fingerprint)))
        plan.delete_uris, plan.delete_local = sorted(uris), sorted(local)
        self.catalogue.save_journal(plan.request_id, plan.to_dict())  # the intent: a rerun deletes the same
        # 2. delete them (a URI outside the store is refused by key_of)
        deleted = set(plan.deleted)
        for uri in plan.delete_uris:
            key = self.store.key_of(uri)
            if _in(key, "compartments") and key.split("/")[1] in active:
                continue
            deleted.update(self.store.delete(key))
            if not self.store.exists(key):
                deleted.add(uri)
        work = (self.work_root / "work").resolve()
        for path in plan.delete_local:
            p = Path(path)
            if not p.resolve().is_relative_to(work):
                raise StoreError(f"{p} is outside the checkpoint directory {work}; refusing to delete it")
            deleted.update(Path(f).as_uri() for f in remove_tree(p))
        if plan.mode == "source" and self.local_cleanup is not None:
            deleted.update(Path(p).as_uri() if p.startswith("/") else p for p in self.local_cleanup(plan.source))
        plan.deleted = sorted(deleted)

    def _step_receipt(self, plan: ForgetPlan) -> None:
        forgotten = {plan.source} if plan.mode in ("source", "superseded") else set()
        untouched = {
            e.compartment_id: e.weights_sha256
            for e in self.catalogue.active()
            if e.source != plan.source and e.source not in forgotten
        }
        now = self.clock()
        receipt = ForgetReceipt(
            request_id=plan.request_id,
            kind=plan.kind,
            source=plan.source,
            outcome=plan.outcome,
            detail=plan.detail,
            n_samples_removed=plan.n_removed,
            fingerprint=plan.old_fingerprint,
            new_fingerprint=plan.new_fingerprint or None,
            retired=tuple(plan.retired),
            new_compartment=plan.new_compartment or None,
            deleted_files=tuple(plan.deleted),
            untouched=untouched,
            router_before=plan.router_before,
            router_after=plan.router_after if plan.mode in ("source", "samples") else plan.router_before,
            router_sha256_before=plan.router_sha256_before,
            router_sha256_after=(
                plan.router_sha256_after if plan.mode in ("source", "samples") else plan.router_sha256_before
            ),
            unmatched_ids=tuple(plan.unmatched),
            n_unmatched=plan.n_unmatched,
            epoch=plan.epoch,
            started_at=plan.started_at,
            completed_at=now,
            seconds=max(0.0, now - plan.started_at),
            slices=plan.slices if plan.steps_retrained is not None else None,
            resumed_from_slice=plan.resumed_from_slice,
            resumed_from_step=plan.resumed_from_step,
            steps_retrained=plan.steps_retrained,
        )
        if not self.catalogue.put_receipt(receipt):
            log.info("forget request %s already has its receipt", plan.request_id)


def _in(key: str, prefix: str) -> bool:
    return key.startswith(prefix.rstrip("/") + "/")


def new_router_id(now: float) -> str:
    """A fresh router id: creation time (garbage collection reads it) and a random suffix."""
    return f"r{int(now)}-{uuid.uuid4().hex[:8]}"


def request_router_id(request_id: str, started_at: float) -> str:
    """The router id of a forget request (the same on a rerun, so a half-finished upload is overwritten)."""
    return f"r{int(started_at)}-{hashlib.sha256(request_id.encode()).hexdigest()[:8]}"


def router_created_at(router_id: str) -> float | None:
    """The creation time encoded in a router id, None for an id not made here."""
    if not _ROUTER_ID.fullmatch(router_id):
        return None
    return float(router_id[1:].split("-", 1)[0])


def through_of(lineages: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """ "topic:partition" -> the highest offset named in the given data lineages (chunk and seal origins)."""
    out: dict[str, int] = {}

    def add(origin: Any) -> None:
        if isinstance(origin, list | tuple) and len(origin) == 3:
            topic, partition, offset = origin
            if isinstance(topic, str) and isinstance(partition, int) and isinstance(offset, int):
                key = f"{topic}:{partition}"
                out[key] = max(offset, out.get(key, -1))

    for lineage in lineages:
        for chunk in lineage.get("chunks", ()) or ():
            if isinstance(chunk, Mapping):
                add(chunk.get("origin"))
        add(lineage.get("seal_origin"))
    return out
