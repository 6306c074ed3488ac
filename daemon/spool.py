"""Durable on-disk staging of source chunks between Kafka and training.

A source moves ``staged -> sealed -> registered`` and may be dropped (forgotten, refused, abandoned) at any
point. Every write is atomic (temp file + fsync + ``os.replace`` + directory fsync), so after a crash the spool
holds exactly the chunks and states whose write completed; leftover temp files are removed when a ``Spool`` is
opened. What the files say is also kept in memory (an index built when the spool is opened), so staging costs
the same for the first chunk of a source and for its ten-thousandth.

Layout (``ROOT`` is the directory given to :class:`Spool`)::

    ROOT/.lock                                   exclusive flock held while a Spool is open (holder's pid)
    ROOT/sources/<source>/chunks/<seq:09d>.npz   chunk payload (cdm.data.npz_bytes; deleted once registered)
    ROOT/sources/<source>/chunks/<seq:09d>.json  chunk record: fingerprint, n_samples, sha256, origin, time
    ROOT/sources/<source>/state.json             seal, seal origin, compartment id (absent while staged)
    ROOT/tombstones/<source>.json                highest offset per partition of a dropped source
    ROOT/quarantine/<name>-<time>/               damaged files moved aside at open (REASON.txt says why)

A tombstone holds no sample data; it lets the spool ignore redelivered records of a forgotten source, whose
offsets may not have been committed yet, so forgetting cannot be undone by a restart.

Idle sealing (a push that stopped without a seal) is measured against fetch activity, not wall time since the
last chunk: the ingestor reports which partitions are *live* (assigned, fetching, caught up with the high
watermark) with :meth:`Spool.set_live_partitions`, and a staged source's idle clock runs only while all of its
partitions are live. A paused consumer (training) or a partition behind its high watermark never seals a
half-fetched source.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, NoReturn

from cdm import fsio
from cdm.data import SourceData, concat, fingerprint, load_npz_bytes, npz_bytes
from cdm.errors import CdmError, DataError
from cdm.fsio import fsync_dir
from daemon.errors import DaemonError
from daemon.wire import Origin, Reason, Seal, WireError, sha256_hex, validate_source_id

log = logging.getLogger(__name__)

FORMAT: Final = 1
_TMP_PREFIX: Final = ".tmp-"
LOCK_FILE: Final = ".lock"
_ALL_PARTITIONS: Final = "*"  # tombstone key covering every partition (replaces a damaged tombstone)
_MAX_OFFSET: Final = 2**63 - 1
_RANGES_SHOWN: Final = 20  # gap ranges listed in an error detail

Partition = tuple[str, int]  # (topic, partition); a kafka TopicPartition compares equal


class SpoolState(enum.StrEnum):
    STAGED = "staged"  # some chunks staged, no valid seal yet
    SEALED = "sealed"  # seal verified; waiting to be trained and registered
    REGISTERED = "registered"  # compartment registered; payloads purged, records kept for idempotence


class SpoolRejected(WireError):
    """A record conflicts with what the spool holds or with its limits (seq-conflict, sealed, missing-chunks,
    seal-mismatch, limit-exceeded, incompatible)."""


class SpoolError(DaemonError):
    """The spool was used out of order (e.g. registering an unsealed source) or its files are damaged."""


class SpoolLocked(SpoolError):
    """Another process (or another Spool object) holds this spool directory."""


@dataclass(frozen=True)
class SpoolLimits:
    """What one spool accepts; a record over a limit is refused (``limit-exceeded``) before it is stored.

    A source that breaks a per-source limit, or that cannot be staged whole because of a spool-wide one, is
    dropped (its records released, later ones of the same push are refused or dropped when idle): a prefix of
    a source is never trained.
    """

    max_sources: int = 1024  # sources holding data at once (staged or sealed, not yet registered)
    max_source_chunks: int = 100_000  # chunks per source: bounds cdm-seq and a seal's "chunks"
    max_source_samples: int = 10_000_000  # samples per source (also bounds a seal's "n_samples")
    max_source_bytes: int = 4 << 30  # decoded array bytes of one source (what training holds in memory)
    max_bytes: int = 32 << 30  # chunk payload bytes on disk, all unregistered sources together

    def __post_init__(self) -> None:
        for name in ("max_sources", "max_source_chunks", "max_source_samples", "max_source_bytes", "max_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"SpoolLimits.{name} = {getattr(self, name)!r} must be > 0")


# Raises cdm.errors.CdmError (naming the problem) when a sealed source can never train under this daemon's
# model (see cdm.training.check_trainable); the spool then refuses the seal as ``incompatible``.
SourceCheck = Callable[[str, SourceData], None]


@dataclass(frozen=True)
class StagedChunk:
    """What the spool recorded about one chunk."""

    seq: int
    n_samples: int
    fingerprint: str  # cdm.data.fingerprint of the chunk: the identity used for idempotence
    sha256: str  # of the spooled .npz payload
    size: int  # bytes of the spooled .npz payload
    origin: Origin  # record it came from
    staged_at: float  # clock() when staged
    nbytes: int = 0  # decoded bytes of the chunk's arrays (0 in records written before this field existed)


@dataclass(frozen=True)
class SourceLineage:
    """Everything the spool knows about one source (for receipts and audits)."""

    source: str
    state: SpoolState
    chunks: tuple[StagedChunk, ...]  # in seq order
    seal: Seal | None
    seal_origin: Origin | None
    compartment_id: str | None


@dataclass(frozen=True)
class DropReceipt:
    """What :meth:`Spool.drop` deleted."""

    source: str
    files: tuple[str, ...]  # paths removed
    through: dict[str, int]  # "topic/partition" -> highest offset now ignored for this source


@dataclass(frozen=True)
class Quarantined:
    """A damaged source directory (or tombstone) moved aside when the spool was opened."""

    name: str  # directory name under sources/ (or "tombstone:<source>")
    reason: str
    path: Path  # where it lies now


@dataclass
class _Entry:
    """In-memory index of one source: its chunk records and state record, with running totals."""

    chunks: dict[int, StagedChunk] = field(default_factory=dict)
    record: dict[str, Any] | None = None  # state.json (None while staged)
    samples: int = 0
    nbytes: int = 0
    size: int = 0  # payload bytes on disk (0 once registered)
    refused_seal: str = ""  # why the producer's seal was refused (in memory): idle sealing then drops instead
    refused_reason: Reason = "missing-chunks"

    @property
    def state(self) -> SpoolState | None:
        if self.record is not None:
            return SpoolState(self.record["state"])
        return SpoolState.STAGED if self.chunks else None

    def add(self, chunk: StagedChunk) -> None:
        self.chunks[chunk.seq] = chunk
        self.samples += chunk.n_samples
        self.nbytes += chunk.nbytes
        self.size += chunk.size

    def partitions(self) -> set[Partition]:
        return {(c.origin.topic, c.origin.partition) for c in self.chunks.values()}

    def origins(self) -> list[Origin]:
        out = [c.origin for c in self.chunks.values()]
        if self.record is not None and self.record.get("seal_origin"):
            out.append(Origin(*self.record["seal_origin"]))
        return out


class IdleClock:
    """How long a staged source has been quiet while its partitions were fetched and caught up.

    Not thread-safe on its own; the :class:`Spool` guards it with its lock.
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._live_since: dict[Partition, float] = {}
        self._active: dict[str, float] = {}  # source -> time of its last record

    def touch(self, source: str) -> None:
        self._active[source] = self._clock()

    def forget(self, source: str) -> None:
        self._active.pop(source, None)

    def set_live(self, partitions: Iterable[Partition]) -> None:
        """The partitions live now; one that was not live before starts its clock now."""
        now = self._clock()
        self._live_since = {(p[0], p[1]): self._live_since.get((p[0], p[1]), now) for p in partitions}

    def quiet_s(self, source: str, partitions: set[Partition]) -> float | None:
        """Seconds since the later of its last record and its partitions becoming live; None if one is not live."""
        if not partitions or any(p not in self._live_since for p in partitions):
            return None
        now = self._clock()
        since = max([self._active.get(source, now), *(self._live_since[p] for p in partitions)])
        return now - since


def write_atomic(path: Path, data: bytes) -> None:
    """``cdm.fsio.write_atomic`` with the spool's temp-file prefix (which recovery sweeps): a crash leaves either
    the old file or the new one, never half."""
    fsio.write_atomic(path, data, tmp_prefix=_TMP_PREFIX)


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, indent=1).encode()


def _origin_key(origin: Origin) -> str:
    return f"{origin.topic}/{origin.partition}"


def _gaps(seqs: Iterable[int], n: int) -> list[tuple[int, int]]:
    """Ranges ``(lo, hi)`` of ``0..n-1`` not in ``seqs``; linear in ``len(seqs)``, whatever ``n`` is."""
    gaps: list[tuple[int, int]] = []
    expected = 0
    for seq in sorted(s for s in seqs if s < n):
        if seq > expected:
            gaps.append((expected, seq - 1))
        expected = seq + 1
    if expected < n:
        gaps.append((expected, n - 1))
    return gaps


def _fmt_ranges(ranges: list[tuple[int, int]]) -> str:
    """'0-3,7' rendering of ranges, at most _RANGES_SHOWN of them, for error details."""
    shown = [str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in ranges[:_RANGES_SHOWN]]
    more = f",… ({len(ranges) - _RANGES_SHOWN} more ranges)" if len(ranges) > _RANGES_SHOWN else ""
    return ",".join(shown) + more


def _ranges(numbers: Iterable[int]) -> str:
    nums = sorted(numbers)
    ranges: list[tuple[int, int]] = []
    for n in nums:
        if ranges and n == ranges[-1][1] + 1:
            ranges[-1] = (ranges[-1][0], n)
        else:
            ranges.append((n, n))
    return _fmt_ranges(ranges)


def _nbytes(data: SourceData) -> int:
    return int(data.images.nbytes + data.ids.nbytes + (data.labels.nbytes if data.labels is not None else 0))


def _acquire_lock(root: Path) -> int:
    """An exclusive, non-blocking flock on ROOT/.lock (held until the fd is closed); the holder's pid inside."""
    path = root / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        finally:
            os.close(fd)
        raise SpoolLocked(
            f"spool directory {root} is in use by another daemon (pid {holder}, lock {path}); every daemon "
            "needs its own daemon.spool_dir: stop the other one or point this one at another directory"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


class Spool:
    """Durable per-source staging area; all methods are thread-safe.

    Opening a spool takes an exclusive lock on its directory (two daemons on one spool would stage, seal and
    train the same sources twice); :meth:`close` releases it.

    Args:
        root: directory owned by this spool (created if missing).
        clock: wall-clock seconds for the recorded times.
        monotonic: seconds for the idle clock (injectable for tests).
        limits: what the spool accepts (see :class:`SpoolLimits`).
        check: called on a source's data before its seal is accepted; raising ``cdm.errors.CdmError`` refuses
            the seal as ``incompatible`` and drops the source (it could never train).

    Raises:
        SpoolLocked: the directory is held by another process or Spool.
    """

    def __init__(
        self,
        root: Path,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        limits: SpoolLimits | None = None,
        check: SourceCheck | None = None,
    ) -> None:
        self.root = Path(root)
        self._clock = clock
        self.limits = limits or SpoolLimits()
        self._check = check
        self._lock = threading.RLock()
        self._idle = IdleClock(monotonic)
        self._index: dict[str, _Entry] = {}
        self._tombs: dict[str, dict[str, int]] = {}
        self._bytes = 0  # payload bytes of the index (staged_bytes)
        self._drop_listeners: list[Callable[[str], None]] = []
        self._dropped: list[str] = []  # drops not yet told to the listeners (told outside the lock)
        self.quarantined: list[Quarantined] = []  # what the last open moved aside
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock_fd: int | None = _acquire_lock(self.root)
        try:
            (self.root / "sources").mkdir(exist_ok=True)
            (self.root / "tombstones").mkdir(exist_ok=True)
            self._recover()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the directory lock (idempotent). The object must not be used afterwards."""
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add_drop_listener(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(source)`` (never with the spool lock held) whenever a source is dropped."""
        self._drop_listeners.append(listener)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """The spool lock; drop listeners are told after it is released."""
        try:
            with self._lock:
                yield
        finally:
            with self._lock:
                dropped, self._dropped = self._dropped, []
            for source in dropped:
                for listener in self._drop_listeners:
                    listener(source)

    # ------------------------------------------------------------------------------------------- paths

    def _dir(self, source: str) -> Path:
        return self.root / "sources" / validate_source_id(source)

    def _chunk_paths(self, source: str, seq: int) -> tuple[Path, Path]:
        base = self._dir(source) / "chunks" / f"{seq:09d}"
        return base.with_suffix(".npz"), base.with_suffix(".json")

    def _tombstone_path(self, source: str) -> Path:
        return self.root / "tombstones" / f"{validate_source_id(source)}.json"

    # ------------------------------------------------------------------------------------------- reading

    def state(self, source: str) -> SpoolState | None:
        """The source's state, or None when the spool holds nothing for it."""
        with self._lock:
            entry = self._index.get(source)
            return entry.state if entry is not None else None

    def sources(self, state: SpoolState | str | None = None) -> list[str]:
        """Sources held by the spool, sorted; only those in ``state`` when given."""
        want = SpoolState(state) if state is not None else None
        with self._lock:
            return sorted(
                n for n, e in self._index.items() if (s := e.state) is not None and (want is None or s == want)
            )

    def set_live_partitions(self, partitions: Iterable[Partition]) -> None:
        """The partitions whose records are being fetched and are caught up now (the ingestor calls this after
        every poll; an empty set while paused). The idle clock of a source runs only while all its partitions
        are live."""
        with self._lock:
            self._idle.set_live(partitions)

    def idle_sources(self, idle_s: float) -> list[str]:
        """Staged (unsealed) sources with no new record for ``idle_s`` seconds of live fetching: abandoned pushes.

        Their records hold back the offset commits of their partitions until they are sealed or dropped.
        """
        with self._lock:
            out = []
            for name in self.sources(SpoolState.STAGED):
                quiet = self._idle.quiet_s(name, self._index[name].partitions())
                if quiet is not None and quiet > idle_s:
                    out.append(name)
            return out

    def lineage(self, source: str) -> SourceLineage:
        """Origins of every chunk and of the seal; raises SpoolError for a source the spool does not hold."""
        with self._lock:
            entry = self._index.get(source)
            state = entry.state if entry is not None else None
            if entry is None or state is None:
                raise SpoolError(f"the spool holds no source {source!r}; it holds {self.sources()}")
            record = entry.record or {}
            seal = record.get("seal")
            return SourceLineage(
                source=source,
                state=state,
                chunks=tuple(c for _, c in sorted(entry.chunks.items())),
                seal=Seal(source=source, **seal) if seal else None,
                seal_origin=Origin(*record["seal_origin"]) if record.get("seal_origin") else None,
                compartment_id=record.get("compartment_id"),
            )

    def forgotten(self, source: str, origin: Origin) -> bool:
        """True when ``origin`` is a record of ``source`` at or below the offset where it was dropped."""
        with self._lock:
            through = self._tombs.get(source)
            if through is None:
                return False
            limit = max(through.get(_origin_key(origin), -1), through.get(_ALL_PARTITIONS, -1))
            return origin.offset <= limit

    def staged_bytes(self) -> int:
        """Bytes of chunk payloads currently on disk (registered sources hold none)."""
        with self._lock:
            return self._bytes

    # ------------------------------------------------------------------------------------------- writing

    def stage_chunk(self, source: str, seq: int, data: SourceData, origin: Origin | tuple[str, int, int]) -> bool:
        """Stage chunk ``seq`` of ``source`` durably.

        Returns:
            True when newly staged; False for a redelivery of the same content (or of a forgotten record).

        Raises:
            SpoolRejected: ``seq-conflict`` when different content is staged under this seq, ``sealed`` when
                the source is sealed, ``limit-exceeded`` when the chunk would break a :class:`SpoolLimits`
                limit (checked before anything is written; the source is dropped, see SpoolLimits).
        """
        origin = Origin(*origin)
        if seq < 0:
            raise ValueError(f"seq must be >= 0, got {seq}")
        validate_source_id(source)
        fp = fingerprint(data)
        with self._locked():
            if self.forgotten(source, origin):
                return False
            entry = self._index.get(source)
            existing = entry.chunks.get(seq) if entry is not None else None
            if entry is not None and existing is not None:
                if existing.fingerprint == fp:
                    if entry.record is None:
                        self._idle.touch(source)
                    return False
                raise SpoolRejected(
                    "seq-conflict",
                    f"chunk {source}#{seq} was staged from {existing.origin} with fingerprint "
                    f"{existing.fingerprint[:16]}…; this record carries {fp[:16]}… "
                    "(push under a new source id, or forget-source first)",
                )
            if entry is not None and entry.record is not None:
                raise SpoolRejected(
                    "sealed",
                    f"{source} is already {entry.record['state']} with {entry.record['seal']['chunks']} chunks; "
                    f"chunk #{seq} cannot be added (forget-source first to replace it)",
                )
            self._check_chunk_limits(source, entry, seq, data, origin)
            payload = npz_bytes(data)
            total = self.staged_bytes()
            if total + len(payload) > self.limits.max_bytes:
                self._refuse(
                    source,
                    origin,
                    f"chunk {source}#{seq} ({len(payload)} bytes) would bring the spool to {total + len(payload)} "
                    f"bytes, over daemon.spool_max_bytes = {self.limits.max_bytes}; push it again once "
                    "staged sources are trained",
                )
            # 1. payload, 2. record (its presence is what makes the chunk exist), each atomic and fsynced.
            payload_path, record_path = self._chunk_paths(source, seq)
            if not payload_path.parent.is_dir():
                payload_path.parent.mkdir(parents=True)
                fsync_dir(payload_path.parent.parent)
                fsync_dir(payload_path.parent.parent.parent)
            write_atomic(payload_path, payload)
            chunk = StagedChunk(
                seq=seq,
                n_samples=len(data),
                fingerprint=fp,
                sha256=sha256_hex(payload),
                size=len(payload),
                origin=origin,
                staged_at=self._clock(),
                nbytes=_nbytes(data),
            )
            record = {
                "format": FORMAT,
                "seq": chunk.seq,
                "n_samples": chunk.n_samples,
                "fingerprint": chunk.fingerprint,
                "sha256": chunk.sha256,
                "size": chunk.size,
                "nbytes": chunk.nbytes,
                "origin": list(origin),
                "staged_at": chunk.staged_at,
            }
            write_atomic(record_path, _json_bytes(record))
            self._index.setdefault(source, _Entry()).add(chunk)
            self._bytes += chunk.size
            self._idle.touch(source)
            return True

    def _check_chunk_limits(
        self, source: str, entry: _Entry | None, seq: int, data: SourceData, origin: Origin
    ) -> None:
        lim = self.limits
        if seq >= lim.max_source_chunks:
            self._refuse(
                source, origin, f"chunk {source}#{seq}: seq must be below daemon.max_chunks_per_source = "
                f"{lim.max_source_chunks}",
            )  # fmt: skip
        if entry is None:
            holding = sum(1 for e in self._index.values() if e.state in (SpoolState.STAGED, SpoolState.SEALED))
            if holding >= lim.max_sources:
                self._refuse(
                    source, origin, f"the spool holds {holding} unfinished sources, daemon.spool_max_sources = "
                    f"{lim.max_sources}; {source} was not started: push it again once staged sources are trained",
                )  # fmt: skip
        samples = (entry.samples if entry else 0) + len(data)
        if samples > lim.max_source_samples:
            self._refuse(
                source, origin, f"chunk {source}#{seq} brings {source} to {samples} samples, over "
                f"daemon.spool_max_source_samples = {lim.max_source_samples}",
            )  # fmt: skip
        nbytes = (entry.nbytes if entry else 0) + _nbytes(data)
        if nbytes > lim.max_source_bytes:
            self._refuse(
                source, origin, f"chunk {source}#{seq} brings {source} to {nbytes} decoded bytes, over "
                f"daemon.spool_max_source_bytes = {lim.max_source_bytes}",
            )  # fmt: skip

    def _refuse(self, source: str, origin: Origin, detail: str, reason: Reason = "limit-exceeded") -> NoReturn:
        """Drop what is staged of ``source`` (it can no longer be completed) and refuse the record."""
        entry = self._index.get(source)
        if entry is not None:
            self._drop_locked(source, also=[origin])
            detail += f"; {source} was dropped with its {len(entry.chunks)} staged chunk(s)"
        raise SpoolRejected(reason, detail)

    def seal(self, source: str, seal: Seal, origin: Origin | tuple[str, int, int]) -> bool:
        """Verify ``seal`` against the staged chunks and mark the source sealed durably.

        Returns:
            True when newly sealed; False for a redelivery of the same seal (or of a forgotten record).

        Raises:
            SpoolRejected: ``missing-chunks``, ``seal-mismatch`` (extra chunks, sample count, fingerprint or
                chunks that cannot be concatenated), ``sealed`` (a different seal was accepted before),
                ``limit-exceeded`` (more chunks or samples than the limits allow) or ``incompatible`` (the
                source can never train under this daemon's model); the last two drop the source.
        """
        origin = Origin(*origin)
        if seal.source != source:
            raise ValueError(f"seal is for {seal.source!r}, not {source!r}")
        with self._locked():
            return self._seal_locked(source, seal, origin)

    def _seal_locked(self, source: str, seal: Seal, origin: Origin, *, idle: bool = False) -> bool:
        if self.forgotten(source, origin):
            return False
        entry = self._index.get(source)
        if entry is not None and entry.record is not None:
            if Seal(source=source, **entry.record["seal"]) == seal:
                return False
            raise SpoolRejected(
                "sealed", f"{source} is already {entry.record['state']} with seal {entry.record['seal']}; got {seal}"
            )
        lim = self.limits
        if seal.chunks > lim.max_source_chunks or seal.n_samples > lim.max_source_samples:
            self._refuse(
                source, origin, f"seal of {source} announces {seal.chunks} chunks and {seal.n_samples} samples; "
                f"the limits are daemon.max_chunks_per_source = {lim.max_source_chunks} and "
                f"daemon.spool_max_source_samples = {lim.max_source_samples}",
            )  # fmt: skip
        chunks = entry.chunks if entry is not None else {}
        try:
            gaps = _gaps(chunks, seal.chunks)
            if gaps:
                raise SpoolRejected(
                    "missing-chunks",
                    f"seal of {source} announces {seal.chunks} chunks; not staged: #{_fmt_ranges(gaps)}",
                )
            extra = [i for i in chunks if i >= seal.chunks]
            if extra:
                raise SpoolRejected(
                    "seal-mismatch",
                    f"seal of {source} announces {seal.chunks} chunks but #{_ranges(extra)} are staged",
                )
            assert entry is not None  # chunks 0..n-1 (n >= 1) are staged
            if entry.samples != seal.n_samples:
                raise SpoolRejected(
                    "seal-mismatch", f"seal of {source} announces {seal.n_samples} samples; staged {entry.samples}"
                )
            try:
                data = self._concat(source, entry.chunks)
            except DataError as exc:
                raise SpoolRejected("seal-mismatch", f"chunks of {source} do not concatenate: {exc}") from exc
            got = fingerprint(data)
            if got != seal.fingerprint:
                raise SpoolRejected(
                    "seal-mismatch",
                    f"fingerprint of the {seal.chunks} staged chunks of {source} is {got}; "
                    f"seal says {seal.fingerprint}",
                )
        except SpoolRejected as exc:
            if entry is not None and not idle:
                entry.refused_seal, entry.refused_reason = exc.detail, exc.reason
            raise
        if self._check is not None:
            try:
                self._check(source, data)
            except CdmError as exc:
                self._refuse(
                    source, origin, f"{source} can never train on this daemon: {exc} (fix the data or the "
                    "[model] config, then push it again)", reason="incompatible",
                )  # fmt: skip
        state = {
            "format": FORMAT,
            "state": SpoolState.SEALED.value,
            "seal": {"chunks": seal.chunks, "fingerprint": seal.fingerprint, "n_samples": seal.n_samples},
            "seal_origin": list(origin),
            "sealed_at": self._clock(),
            "compartment_id": None,
        }
        write_atomic(self._dir(source) / "state.json", _json_bytes(state))
        entry.record = state
        self._idle.forget(source)
        return True

    def seal_idle(self, source: str) -> Seal | None:
        """Seal a staged source whose push went quiet without a seal message (the scheduler's idle-seal job).

        The seal is computed from what is staged. A source that cannot be sealed that way (a gap in its chunks,
        chunks that do not concatenate, a refused seal from its producer: a prefix would be trained) is dropped
        and ``SpoolRejected`` raised: its records are released, and nothing of it is trained. Its origin is the
        newest chunk's record. Returns the seal, or None when the source is not (or no longer) staged.
        """
        with self._locked():
            entry = self._index.get(source)
            if entry is None or entry.state is not SpoolState.STAGED:
                return None
            newest = entry.chunks[max(entry.chunks)].origin
            if entry.refused_seal:
                self._refuse(
                    source, newest, f"{source} went idle after its seal was refused ({entry.refused_seal}); "
                    "no prefix of it is trained: push it again", reason=entry.refused_reason,
                )  # fmt: skip
            gaps = _gaps(entry.chunks, max(entry.chunks) + 1)
            if gaps:
                self._refuse(
                    source, newest, f"{source} went idle with chunks #{_fmt_ranges(gaps)} missing; push it "
                    "again", reason="missing-chunks",
                )  # fmt: skip
            try:
                data = self._concat(source, entry.chunks)
            except DataError as exc:
                self._refuse(
                    source, newest, f"{source} went idle and its chunks do not concatenate ({exc})",
                    reason="seal-mismatch",
                )  # fmt: skip
            seal = Seal(source=source, chunks=len(entry.chunks), fingerprint=fingerprint(data), n_samples=len(data))
            return seal if self._seal_locked(source, seal, newest, idle=True) else None

    def _concat(self, source: str, chunks: dict[int, StagedChunk]) -> SourceData:
        parts = []
        for seq in sorted(chunks):
            path, _ = self._chunk_paths(source, seq)
            try:
                raw = path.read_bytes()
            except FileNotFoundError as exc:
                raise SpoolError(f"payload of {source}#{seq} is missing ({path})") from exc
            if sha256_hex(raw) != chunks[seq].sha256:
                raise SpoolError(f"payload of {source}#{seq} ({path}) does not match its recorded sha256")
            parts.append(load_npz_bytes(raw, where=str(path)))
        return concat(parts)

    def assemble(self, source: str) -> SourceData:
        """The sealed source's data: its chunks concatenated in seq order (payloads re-verified)."""
        with self._lock:
            entry = self._index.get(source)
            state = entry.state if entry is not None else None
            if entry is None or state != SpoolState.SEALED:
                raise SpoolError(f"{source} is {state or 'not in the spool'}; only a sealed source can be assembled")
            return self._concat(source, entry.chunks)

    def mark_registered(self, source: str, compartment_id: str) -> None:
        """Record that ``source`` is trained and registered; its chunk payloads are then deleted."""
        with self._lock:
            entry = self._index.get(source)
            if entry is None or entry.record is None:
                raise SpoolError(f"{source} is {self.state(source) or 'not in the spool'}; seal it before registering")
            record = dict(entry.record)
            if record["state"] == SpoolState.REGISTERED and record["compartment_id"] != compartment_id:
                raise SpoolError(f"{source} is already registered as {record['compartment_id']!r}")
            record.update(state=SpoolState.REGISTERED.value, compartment_id=compartment_id)
            record.setdefault("registered_at", self._clock())
            write_atomic(self._dir(source) / "state.json", _json_bytes(record))
            entry.record = record
            self._purge_payloads(source)

    def _purge_payloads(self, source: str) -> None:
        directory = self._dir(source) / "chunks"
        if directory.is_dir():
            for path in directory.glob("*.npz"):
                path.unlink()
            fsync_dir(directory)
        entry = self._index.get(source)
        if entry is not None:
            self._bytes -= entry.size
            entry.size = 0
        self._idle.forget(source)

    def drop(self, source: str) -> DropReceipt:
        """Delete everything staged for ``source`` (forgetting); redeliveries of its records are ignored."""
        with self._locked():
            if source not in self._index:
                shutil.rmtree(self._dir(source), ignore_errors=True)
                return DropReceipt(source=source, files=(), through={})
            return self._drop_locked(source)

    def _drop_locked(self, source: str, *, also: Iterable[Origin] = ()) -> DropReceipt:
        entry = self._index[source]
        directory = self._dir(source)
        through = dict(self._tombs.get(source, {}))
        for o in [*entry.origins(), *also]:
            through[_origin_key(o)] = max(o.offset, through.get(_origin_key(o), -1))
        # 1. tombstone first: a crash before the delete is finished by _recover() on the next open.
        tomb = {"format": FORMAT, "through": through, "dropped_at": self._clock()}
        write_atomic(self._tombstone_path(source), _json_bytes(tomb))
        self._tombs[source] = through
        files = tuple(str(p) for p in sorted(directory.rglob("*")) if p.is_file())
        shutil.rmtree(directory, ignore_errors=True)
        fsync_dir(directory.parent)
        del self._index[source]
        self._bytes -= entry.size
        self._idle.forget(source)
        self._dropped.append(source)
        return DropReceipt(source=source, files=files, through=through)

    # ------------------------------------------------------------------------------------------- recovery

    def _recover(self) -> None:
        """Build the index; remove temp files, finish interrupted drops and purges; quarantine damage."""
        self._remove_temp_files()
        self._load_tombstones()
        for directory in sorted((self.root / "sources").iterdir()):
            name = directory.name
            if directory.is_symlink() or not directory.is_dir():
                log.warning("spool: ignoring %s (not a source directory)", directory)
                continue
            try:
                validate_source_id(name)
                entry = self._load_source(directory)
            except (WireError, SpoolError) as exc:
                self._quarantine(directory, name, str(exc))
                continue
            if entry.state is None:
                shutil.rmtree(directory)  # only temp files or an empty chunks/ were left
                continue
            origins = entry.origins()
            if origins and all(self.forgotten(name, o) for o in origins):
                shutil.rmtree(directory)  # drop() wrote its tombstone, then crashed before deleting
                continue
            self._index[name] = entry
            if entry.state == SpoolState.REGISTERED:
                self._purge_payloads(name)
                continue
            for payload in (directory / "chunks").glob("*.npz"):
                if not payload.with_suffix(".json").exists():
                    payload.unlink()  # crashed between writing the payload and its record
            lost = [seq for seq in entry.chunks if not self._chunk_paths(name, seq)[0].is_file()]
            if lost:
                del self._index[name]
                self._quarantine(directory, name, f"payloads of chunks #{_ranges(lost)} are missing")
                continue
            if entry.state == SpoolState.STAGED:
                self._idle.touch(name)
        self._bytes = sum(e.size for e in self._index.values())

    def _remove_temp_files(self) -> None:
        """Unlink this spool's own temp files (write_atomic's), never a directory: a source id may look like one."""
        directories = [self.root / "tombstones"]
        for d in (self.root / "sources").iterdir():
            if d.is_dir() and not d.is_symlink():
                directories += [d, d / "chunks"]
        for directory in directories:
            if not directory.is_dir():
                continue
            for path in directory.glob(f"{_TMP_PREFIX}*"):
                if path.is_symlink() or path.is_file():
                    path.unlink()

    def _read_record(self, path: Path) -> dict[str, Any]:
        try:
            obj = json.loads(path.read_bytes())
        except ValueError as exc:
            raise SpoolError(f"{path} is not valid JSON ({exc})") from exc
        except OSError as exc:
            raise SpoolError(f"{path} cannot be read ({exc})") from exc
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise SpoolError(f"{path} is not a format-{FORMAT} spool record")
        return obj

    def _load_source(self, directory: Path) -> _Entry:
        """Read one source directory into an index entry; SpoolError names the first damaged file."""
        entry = _Entry()
        state_path = directory / "state.json"
        if state_path.exists():
            record = self._read_record(state_path)
            try:
                SpoolState(record["state"])
                Seal(source=directory.name, **record["seal"])
                Origin(*record["seal_origin"])
                if record["compartment_id"] is not None and not isinstance(record["compartment_id"], str):
                    raise TypeError("compartment_id must be a string or null")
            except (KeyError, TypeError, ValueError) as exc:
                raise SpoolError(f"{state_path} is not a valid state record ({type(exc).__name__}: {exc})") from exc
            entry.record = record
        chunk_dir = directory / "chunks"
        if chunk_dir.is_dir():
            for path in chunk_dir.glob("*.json"):
                if path.name.startswith(_TMP_PREFIX):
                    continue
                obj = self._read_record(path)
                try:
                    chunk = StagedChunk(
                        seq=int(obj["seq"]),
                        n_samples=int(obj["n_samples"]),
                        fingerprint=str(obj["fingerprint"]),
                        sha256=str(obj["sha256"]),
                        size=int(obj["size"]),
                        origin=Origin(str(obj["origin"][0]), int(obj["origin"][1]), int(obj["origin"][2])),
                        staged_at=float(obj["staged_at"]),
                        nbytes=int(obj.get("nbytes", 0)),
                    )
                except (KeyError, TypeError, ValueError, IndexError) as exc:
                    raise SpoolError(f"{path} is not a valid chunk record ({type(exc).__name__}: {exc})") from exc
                if path.name != f"{chunk.seq:09d}.json":
                    raise SpoolError(f"{path} records seq {chunk.seq}, which does not match its file name")
                entry.add(chunk)
        if entry.record is not None and entry.record["state"] == SpoolState.REGISTERED:
            entry.size = 0
        return entry

    def _load_tombstones(self) -> None:
        for path in sorted((self.root / "tombstones").glob("*.json")):
            if path.name.startswith(_TMP_PREFIX):
                continue
            source = path.name[: -len(".json")]
            try:
                obj = self._read_record(path)
                through = obj["through"]
                if not isinstance(through, dict) or not all(
                    isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in through.items()
                ):
                    raise SpoolError(f"{path}: 'through' must map \"topic/partition\" to an offset")
            except (SpoolError, KeyError) as exc:
                # Losing a tombstone would let redelivered records resurrect forgotten data: keep the source
                # forgotten on every partition instead (a new push under this id needs the tombstone removed).
                moved = self._quarantine(path, f"tombstone:{source}", str(exc))
                through = {_ALL_PARTITIONS: _MAX_OFFSET}
                tomb = {"format": FORMAT, "through": through, "dropped_at": self._clock(), "replaces": str(moved)}
                write_atomic(path, _json_bytes(tomb))
            self._tombs[source] = through

    def _quarantine(self, path: Path, name: str, reason: str) -> Path:
        """Move a damaged source directory or tombstone aside under ROOT/quarantine, with a REASON.txt."""
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(self._clock()))
        qdir = self.root / "quarantine"
        qdir.mkdir(exist_ok=True)
        target = qdir / f"{path.name}-{stamp}"
        n = 1
        while target.exists():
            n += 1
            target = qdir / f"{path.name}-{stamp}-{n}"
        os.replace(path, target)
        fsync_dir(path.parent)
        note = f"{name}: {reason}\n"
        (target / "REASON.txt" if target.is_dir() else target.with_name(target.name + ".REASON.txt")).write_text(note)
        fsync_dir(qdir)
        log.error(
            "spool: quarantined %s (%s) to %s; its uncommitted records are fetched and staged again, nothing of it "
            "is trained from the damaged copy",
            name,
            reason,
            target,
        )
        self.quarantined.append(Quarantined(name=name, reason=reason, path=target))
        return target
