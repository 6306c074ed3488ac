"""Durable on-disk staging of source chunks between Kafka and training.

A source moves ``staged -> sealed -> registered`` and may be dropped (forgotten) at any point. Every write is
atomic (temp file + fsync + ``os.replace`` + directory fsync), so after a crash the spool holds exactly the
chunks and states whose write completed; leftover temp files are removed when a ``Spool`` is opened.

Layout (``ROOT`` is the directory given to :class:`Spool`)::

    ROOT/sources/<source>/chunks/<seq:09d>.npz   chunk payload (cdm.data.npz_bytes; deleted once registered)
    ROOT/sources/<source>/chunks/<seq:09d>.json  chunk record: fingerprint, n_samples, sha256, origin, time
    ROOT/sources/<source>/state.json             seal, seal origin, compartment id (absent while staged)
    ROOT/tombstones/<source>.json                highest offset per partition of a dropped source

A tombstone holds no sample data; it lets the spool ignore redelivered records of a forgotten source, whose
offsets may not have been committed yet, so forgetting cannot be undone by a restart.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cdm.artifacts import fsync_dir
from cdm.data import SourceData, concat, fingerprint, load_npz_bytes, npz_bytes
from cdm.errors import DataError
from daemon.errors import DaemonError
from daemon.wire import Origin, Seal, WireError, sha256_hex, validate_source_id

FORMAT: Final = 1
_TMP_PREFIX: Final = ".tmp-"


class SpoolState(enum.StrEnum):
    STAGED = "staged"  # some chunks staged, no valid seal yet
    SEALED = "sealed"  # seal verified; waiting to be trained and registered
    REGISTERED = "registered"  # compartment registered; payloads purged, records kept for idempotence


class SpoolRejected(WireError):
    """A record conflicts with what the spool holds (seq-conflict, sealed, missing-chunks, seal-mismatch)."""


class SpoolError(DaemonError):
    """The spool was used out of order (e.g. registering an unsealed source) or its files are damaged."""


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


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old file or the new one, never half."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_TMP_PREFIX, suffix=f"-{path.name}")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, indent=1).encode()


def _origin_key(origin: Origin) -> str:
    return f"{origin.topic}/{origin.partition}"


def _ranges(numbers: Iterable[int]) -> str:
    """Compact '0-3,7' rendering of sorted integers, for error details."""
    out: list[str] = []
    nums = sorted(numbers)
    i = 0
    while i < len(nums):
        j = i
        while j + 1 < len(nums) and nums[j + 1] == nums[j] + 1:
            j += 1
        out.append(str(nums[i]) if i == j else f"{nums[i]}-{nums[j]}")
        i = j + 1
    return ",".join(out)


class Spool:
    """Durable per-source staging area; all methods are thread-safe.

    Args:
        root: directory owned by this spool (created if missing).
        clock: wall-clock seconds for the recorded times.
    """

    def __init__(self, root: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.root = Path(root)
        self._clock = clock
        self._lock = threading.RLock()
        (self.root / "sources").mkdir(parents=True, exist_ok=True)
        (self.root / "tombstones").mkdir(parents=True, exist_ok=True)
        self._recover()

    # ------------------------------------------------------------------------------------------- paths

    def _dir(self, source: str) -> Path:
        return self.root / "sources" / validate_source_id(source)

    def _chunk_paths(self, source: str, seq: int) -> tuple[Path, Path]:
        base = self._dir(source) / "chunks" / f"{seq:09d}"
        return base.with_suffix(".npz"), base.with_suffix(".json")

    def _tombstone_path(self, source: str) -> Path:
        return self.root / "tombstones" / f"{validate_source_id(source)}.json"

    # ------------------------------------------------------------------------------------------- reading

    def _read_json(self, path: Path) -> dict[str, Any] | None:
        try:
            obj = json.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except ValueError as exc:
            raise SpoolError(f"{path} is not valid JSON ({exc}); the spool is damaged") from exc
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise SpoolError(f"{path} is not a format-{FORMAT} spool record")
        return obj

    def _chunks(self, source: str) -> dict[int, StagedChunk]:
        chunks: dict[int, StagedChunk] = {}
        directory = self._dir(source) / "chunks"
        if not directory.is_dir():
            return chunks
        for path in directory.glob("*.json"):
            if path.name.startswith(_TMP_PREFIX):
                continue
            obj = self._read_json(path)
            assert obj is not None
            chunk = StagedChunk(
                seq=obj["seq"],
                n_samples=obj["n_samples"],
                fingerprint=obj["fingerprint"],
                sha256=obj["sha256"],
                size=obj["size"],
                origin=Origin(*obj["origin"]),
                staged_at=obj["staged_at"],
            )
            chunks[chunk.seq] = chunk
        return chunks

    def _state_record(self, source: str) -> dict[str, Any] | None:
        return self._read_json(self._dir(source) / "state.json")

    def state(self, source: str) -> SpoolState | None:
        """The source's state, or None when the spool holds nothing for it."""
        with self._lock:
            record = self._state_record(source)
            if record is not None:
                return SpoolState(record["state"])
            return SpoolState.STAGED if self._chunks(source) else None

    def sources(self, state: SpoolState | str | None = None) -> list[str]:
        """Sources held by the spool, sorted; only those in ``state`` when given."""
        want = SpoolState(state) if state is not None else None
        with self._lock:
            names = sorted(p.name for p in (self.root / "sources").iterdir() if p.is_dir())
            return [n for n in names if (s := self.state(n)) is not None and (want is None or s == want)]

    def idle_sources(self, idle_s: float) -> list[str]:
        """Staged (unsealed) sources whose newest chunk is older than ``idle_s`` seconds: abandoned pushes.

        Their records hold back the offset commits of their partitions until they are sealed or dropped.
        """
        now = self._clock()
        with self._lock:
            return [
                s
                for s in self.sources(SpoolState.STAGED)
                if now - max(c.staged_at for c in self._chunks(s).values()) > idle_s
            ]

    def lineage(self, source: str) -> SourceLineage:
        """Origins of every chunk and of the seal; raises SpoolError for a source the spool does not hold."""
        with self._lock:
            state = self.state(source)
            if state is None:
                raise SpoolError(f"the spool holds no source {source!r}; it holds {self.sources()}")
            record = self._state_record(source) or {}
            seal = record.get("seal")
            return SourceLineage(
                source=source,
                state=state,
                chunks=tuple(c for _, c in sorted(self._chunks(source).items())),
                seal=Seal(source=source, **seal) if seal else None,
                seal_origin=Origin(*record["seal_origin"]) if record.get("seal_origin") else None,
                compartment_id=record.get("compartment_id"),
            )

    def forgotten(self, source: str, origin: Origin) -> bool:
        """True when ``origin`` is a record of ``source`` at or below the offset where it was dropped."""
        with self._lock:
            tomb = self._read_json(self._tombstone_path(source))
            if tomb is None:
                return False
            through = tomb["through"].get(_origin_key(origin))
            return through is not None and origin.offset <= through

    def staged_bytes(self) -> int:
        """Bytes of chunk payloads currently on disk (registered sources hold none)."""
        with self._lock:
            return sum(p.stat().st_size for p in (self.root / "sources").glob("*/chunks/*.npz"))

    # ------------------------------------------------------------------------------------------- writing

    def stage_chunk(self, source: str, seq: int, data: SourceData, origin: Origin | tuple[str, int, int]) -> bool:
        """Stage chunk ``seq`` of ``source`` durably.

        Returns:
            True when newly staged; False for a redelivery of the same content (or of a forgotten record).

        Raises:
            SpoolRejected: ``seq-conflict`` when different content is staged under this seq, ``sealed`` when
                the source is sealed with fewer chunks than ``seq + 1``.
        """
        origin = Origin(*origin)
        if seq < 0:
            raise ValueError(f"seq must be >= 0, got {seq}")
        fp = fingerprint(data)
        with self._lock:
            if self.forgotten(source, origin):
                return False
            existing = self._chunks(source).get(seq)
            if existing is not None:
                if existing.fingerprint == fp:
                    return False
                raise SpoolRejected(
                    "seq-conflict",
                    f"chunk {source}#{seq} was staged from {existing.origin} with fingerprint "
                    f"{existing.fingerprint[:16]}…; this record carries {fp[:16]}… "
                    "(push under a new source id, or forget-source first)",
                )
            record = self._state_record(source)
            if record is not None:
                raise SpoolRejected(
                    "sealed",
                    f"{source} is already {record['state']} with {record['seal']['chunks']} chunks; "
                    f"chunk #{seq} cannot be added (forget-source first to replace it)",
                )
            # 1. payload, 2. record (its presence is what makes the chunk exist), each atomic and fsynced.
            payload_path, record_path = self._chunk_paths(source, seq)
            if not payload_path.parent.is_dir():
                payload_path.parent.mkdir(parents=True)
                fsync_dir(payload_path.parent.parent)
                fsync_dir(payload_path.parent.parent.parent)
            payload = npz_bytes(data)
            write_atomic(payload_path, payload)
            chunk = {
                "format": FORMAT,
                "seq": seq,
                "n_samples": len(data),
                "fingerprint": fp,
                "sha256": sha256_hex(payload),
                "size": len(payload),
                "origin": list(origin),
                "staged_at": self._clock(),
            }
            write_atomic(record_path, _json_bytes(chunk))
            return True

    def seal(self, source: str, seal: Seal, origin: Origin | tuple[str, int, int]) -> bool:
        """Verify ``seal`` against the staged chunks and mark the source sealed durably.

        Returns:
            True when newly sealed; False for a redelivery of the same seal (or of a forgotten record).

        Raises:
            SpoolRejected: ``missing-chunks``, ``seal-mismatch`` (extra chunks, sample count, fingerprint or
                chunks that cannot be concatenated) or ``sealed`` (a different seal was accepted before).
        """
        origin = Origin(*origin)
        if seal.source != source:
            raise ValueError(f"seal is for {seal.source!r}, not {source!r}")
        with self._lock:
            if self.forgotten(source, origin):
                return False
            record = self._state_record(source)
            if record is not None:
                if Seal(source=source, **record["seal"]) == seal:
                    return False
                raise SpoolRejected(
                    "sealed", f"{source} is already {record['state']} with seal {record['seal']}; got {seal}"
                )
            chunks = self._chunks(source)
            missing = [i for i in range(seal.chunks) if i not in chunks]
            if missing:
                raise SpoolRejected(
                    "missing-chunks",
                    f"seal of {source} announces {seal.chunks} chunks; not staged: #{_ranges(missing)}",
                )
            extra = [i for i in chunks if i >= seal.chunks]
            if extra:
                raise SpoolRejected(
                    "seal-mismatch",
                    f"seal of {source} announces {seal.chunks} chunks but #{_ranges(extra)} are staged",
                )
            n = sum(c.n_samples for c in chunks.values())
            if n != seal.n_samples:
                raise SpoolRejected("seal-mismatch", f"seal of {source} announces {seal.n_samples} samples; staged {n}")
            try:
                got = fingerprint(self._concat(source, chunks))
            except DataError as exc:
                raise SpoolRejected("seal-mismatch", f"chunks of {source} do not concatenate: {exc}") from exc
            if got != seal.fingerprint:
                raise SpoolRejected(
                    "seal-mismatch",
                    f"fingerprint of the {seal.chunks} staged chunks of {source} is {got}; "
                    f"seal says {seal.fingerprint}",
                )
            state = {
                "format": FORMAT,
                "state": SpoolState.SEALED.value,
                "seal": {"chunks": seal.chunks, "fingerprint": seal.fingerprint, "n_samples": seal.n_samples},
                "seal_origin": list(origin),
                "sealed_at": self._clock(),
                "compartment_id": None,
            }
            write_atomic(self._dir(source) / "state.json", _json_bytes(state))
            return True

    def seal_idle(self, source: str) -> Seal | None:
        """Seal a staged source whose push went quiet without a seal message (the scheduler's idle-seal job).

        The seal is computed from what is staged, so it needs chunks 0..n-1 without a gap (else
        ``SpoolRejected("missing-chunks")``: a chunk may still be on its way). Its origin is the newest chunk's
        record. Returns the seal, or None when the source is not (or no longer) staged.
        """
        with self._lock:
            if self.state(source) is not SpoolState.STAGED:
                return None
            chunks = self._chunks(source)
            gaps = [i for i in range(max(chunks) + 1) if i not in chunks] if chunks else []
            if not chunks or gaps:
                raise SpoolRejected("missing-chunks", f"{source} went idle with chunks #{_ranges(gaps)} missing")
            data = self._concat(source, chunks)
            seal = Seal(source=source, chunks=len(chunks), fingerprint=fingerprint(data), n_samples=len(data))
            newest = chunks[max(chunks)].origin
        return seal if self.seal(source, seal, newest) else None

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
            state = self.state(source)
            if state != SpoolState.SEALED:
                raise SpoolError(f"{source} is {state or 'not in the spool'}; only a sealed source can be assembled")
            return self._concat(source, self._chunks(source))

    def mark_registered(self, source: str, compartment_id: str) -> None:
        """Record that ``source`` is trained and registered; its chunk payloads are then deleted."""
        with self._lock:
            record = self._state_record(source)
            if record is None:
                raise SpoolError(f"{source} is {self.state(source) or 'not in the spool'}; seal it before registering")
            if record["state"] == SpoolState.REGISTERED and record["compartment_id"] != compartment_id:
                raise SpoolError(f"{source} is already registered as {record['compartment_id']!r}")
            record.update(state=SpoolState.REGISTERED.value, compartment_id=compartment_id)
            record.setdefault("registered_at", self._clock())
            write_atomic(self._dir(source) / "state.json", _json_bytes(record))
            self._purge_payloads(source)

    def _purge_payloads(self, source: str) -> None:
        directory = self._dir(source) / "chunks"
        for path in directory.glob("*.npz"):
            path.unlink()
        fsync_dir(directory)

    def drop(self, source: str) -> DropReceipt:
        """Delete everything staged for ``source`` (forgetting); redeliveries of its records are ignored."""
        with self._lock:
            directory = self._dir(source)
            if self.state(source) is None:
                shutil.rmtree(directory, ignore_errors=True)
                return DropReceipt(source=source, files=(), through={})
            lineage = self.lineage(source)
            origins = [c.origin for c in lineage.chunks] + ([lineage.seal_origin] if lineage.seal_origin else [])
            tomb_path = self._tombstone_path(source)
            through: dict[str, int] = dict((self._read_json(tomb_path) or {}).get("through", {}))
            for o in origins:
                through[_origin_key(o)] = max(o.offset, through.get(_origin_key(o), -1))
            # 1. tombstone first: a crash before the delete is finished by _recover() on the next open.
            write_atomic(tomb_path, _json_bytes({"format": FORMAT, "through": through, "dropped_at": self._clock()}))
            files = tuple(str(p) for p in sorted(directory.rglob("*")) if p.is_file())
            shutil.rmtree(directory)
            fsync_dir(directory.parent)
            return DropReceipt(source=source, files=files, through=through)

    # ------------------------------------------------------------------------------------------- recovery

    def _recover(self) -> None:
        """Remove temp files, finish interrupted drops and purges (called when the spool is opened)."""
        for path in self.root.rglob(f"{_TMP_PREFIX}*"):
            path.unlink()
        for directory in sorted((self.root / "sources").iterdir()):
            if not directory.is_dir():
                continue
            source = directory.name
            state = self.state(source)
            if state is None:
                shutil.rmtree(directory)  # only temp files or an empty chunks/ were left
                continue
            lineage = self.lineage(source)
            origins = [c.origin for c in lineage.chunks] + ([lineage.seal_origin] if lineage.seal_origin else [])
            if origins and all(self.forgotten(source, o) for o in origins):
                shutil.rmtree(directory)  # drop() wrote its tombstone, then crashed before deleting
            elif state == SpoolState.REGISTERED:
                self._purge_payloads(source)
            else:
                for payload in (directory / "chunks").glob("*.npz"):
                    if not payload.with_suffix(".json").exists():
                        payload.unlink()  # crashed between writing the payload and its record
