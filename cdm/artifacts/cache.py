"""A content-addressed local cache of artifact files, fetched from any ArtifactStore by the sha256 the
registry records, verified before anything can decode them, bounded in size with LRU eviction.

Layout (one filesystem, so every rename and hard link is atomic)::

    <root>/blobs/<sha256>     verified file contents, read-only; mtime = last use (the LRU order)
    <root>/views/<id>/<rel>   hard links to blobs in an artifact's own layout (what a loader opens)
    <root>/tmp/               downloads in progress (<sha256>.<pid>.<random>), views being built
    <root>/.lock              flock serialising inserts, pins and evictions across processes

Pins are shared ``flock``s on open blob files held by a ``Checkout``: eviction takes an exclusive,
non-blocking lock before unlinking, so a blob in use by an open composition (in any process) is never
evicted, and a crashed process's pins vanish with it. Two processes fetching the same blob both download
into their own temp file; the first rename wins and the other discards its copy.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from cdm.artifacts.store import CHUNK_BYTES, ArtifactStore, StoredFile, check_key, check_sha256
from cdm.errors import IntegrityError, StoreError
from cdm.fsio import fsync_dir
from common.runtime import pid_alive

_ATTEMPTS = 3  # re-fetches when a blob vanishes (evicted by another process) or is found corrupt


class CacheFullError(StoreError):
    """The cache cannot take a file within its size bound because the rest is pinned (in use)."""


class PathOutsideCacheError(StoreError):
    """A path given to the cache resolves (through symlinks) to somewhere outside the cache root."""


@dataclass(frozen=True)
class CacheUsage:
    """What the cache holds now."""

    bytes: int  # total size of the cached blobs
    blobs: int  # number of cached blobs
    pinned_bytes: int  # held by open checkouts (in any process); never evicted
    max_bytes: int  # the LRU bound


@dataclass(frozen=True)
class Discarded:
    """What ``ArtifactCache.discard`` did."""

    removed: tuple[str, ...]  # sha256 of the blobs deleted now
    pinned: tuple[str, ...]  # still held by an open checkout (in any process): not deleted, try again later


class Checkout:
    """An artifact's verified files in their own layout, pinned in the cache until ``close()``.

    ``path`` is a directory an artifact loader can open (``Compartment.load(checkout.path)``); ``read(rel)``
    returns the bytes of the pinned, verified file itself (no path is looked up again).
    """

    def __init__(self, path: Path, files: dict[str, Path], handles: dict[str, BinaryIO]) -> None:
        self.path = path
        self.files = files  # relative path -> file in ``path``
        self._handles = handles  # relative path -> open blob holding a shared lock (the pin)

    def read(self, rel: str) -> bytes:
        try:
            handle = self._handles[rel]
        except KeyError:
            raise StoreError(f"{rel!r} is not part of this checkout ({sorted(self._handles)})") from None
        if handle.closed:
            raise StoreError(f"checkout {self.path} is closed; check the artifact out again")
        return os.pread(handle.fileno(), os.fstat(handle.fileno()).st_size, 0)

    @property
    def closed(self) -> bool:
        return all(h.closed for h in self._handles.values())

    def close(self) -> None:
        """Unpin (the files may be evicted afterwards). Idempotent."""
        for handle in self._handles.values():
            handle.close()  # closing the descriptor releases its flock

    def __enter__(self) -> Checkout:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class ArtifactCache:
    """Fetch, verify, pin and evict artifact files under ``root`` (created if missing).

    Args:
        root: the cache directory (``[artifacts] cache_dir``); resolved once, symlinks included.
        store: where URIs are fetched from; a URI outside its root is refused.
        max_bytes: LRU bound on the blobs' total size (``[artifacts] cache_max_bytes``).
        clock: seconds since the epoch, stamped on a blob at each use (the LRU order).
    """

    def __init__(
        self, root: Path | str, store: ArtifactStore, max_bytes: int, *, clock: Callable[[], float] = time.time
    ) -> None:
        if max_bytes <= 0:
            raise StoreError(f"cache max_bytes = {max_bytes} must be positive")
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        self.root = root.resolve()
        self.store = store
        self.max_bytes = max_bytes
        self._clock = clock
        self._blobs, self._views, self._tmp = self.root / "blobs", self.root / "views", self.root / "tmp"
        for d in (self._blobs, self._views, self._tmp):
            d.mkdir(exist_ok=True)
        with self._locked():
            self._remove_stale_tmp()

    def __repr__(self) -> str:
        return f"ArtifactCache({str(self.root)!r}, store={self.store!r}, max_bytes={self.max_bytes})"

    # ------------------------------------------------------------------------------------------- public

    def fetch(self, uri: str, sha256: str, *, size: int | None = None) -> Path:
        """The blob of ``uri``, downloaded and verified if not cached yet. Not pinned: use ``checkout``
        (or ``read_verified``) for anything that is going to be decoded."""
        handle, _fresh = self._acquire(uri, check_sha256(sha256), size)
        handle.close()
        return self._blob(sha256)

    def read_verified(self, uri: str, sha256: str, *, size: int | None = None) -> bytes:
        """The bytes of ``uri``, hashed again as read from the cache, so they are exactly what was recorded."""
        digest = check_sha256(sha256)
        for _ in range(_ATTEMPTS):
            handle, _fresh = self._acquire(uri, digest, size)
            with handle:
                data = os.pread(handle.fileno(), os.fstat(handle.fileno()).st_size, 0)
            if hashlib.sha256(data).hexdigest() == digest:
                return data
            self._drop_corrupt(digest)
        raise IntegrityError(f"{uri}: the cached copy keeps failing its sha256 {digest[:16]}…; check the disk")

    def checkout(self, files: Mapping[str, StoredFile], *, verify: bool = True) -> Checkout:
        """Fetch every file of an artifact (``{relative path: StoredFile}`` as the registry records it), pin
        them, and lay them out in a view directory. Hashes are checked on download; with ``verify`` cached
        blobs are hashed again (through the pinned descriptor) before the checkout is returned."""
        entries = {check_key(rel): (f.uri, check_sha256(f.sha256), f.size) for rel, f in files.items()}
        if not entries:
            raise StoreError("cannot check out an artifact with no files")
        for _ in range(_ATTEMPTS):
            handles: dict[str, BinaryIO] = {}
            try:
                corrupt = None
                for rel, (uri, digest, size) in entries.items():
                    handles[rel], fresh = self._acquire(uri, digest, size)
                    if verify and not fresh and _hash_handle(handles[rel]) != digest:
                        corrupt = digest
                        break
                if corrupt is None:
                    with self._locked():
                        view = self._ensure_view(entries, handles)
                    paths = {rel: self.resolve(view / rel) for rel in entries}
                    return Checkout(view, paths, handles)
            except BaseException:
                for handle in handles.values():
                    handle.close()
                raise
            for handle in handles.values():
                handle.close()
            self._drop_corrupt(corrupt)
        raise IntegrityError(f"cached files of this artifact keep failing their sha256 in {self.root}; check the disk")

    def resolve(self, path: Path | str) -> Path:
        """The real path of ``path`` (relative to the root, or absolute), refused unless it lies in the cache."""
        candidate = Path(path)
        if not candidate.is_absolute():
            candidate = self.root / candidate
        try:
            real = candidate.resolve(strict=True)
        except FileNotFoundError:
            raise StoreError(f"{path} does not exist in the artifact cache {self.root}") from None
        except RuntimeError as exc:  # symlink loop
            raise PathOutsideCacheError(f"{path} cannot be resolved ({exc}); refusing it") from None
        if not real.is_relative_to(self.root):
            raise PathOutsideCacheError(
                f"refusing {path}: it resolves to {real}, outside the artifact cache {self.root}; "
                "only files the cache fetched and verified are loaded"
            )
        return real

    def usage(self) -> CacheUsage:
        with self._locked():
            blobs = self._scan()
            pinned = sum(size for _, size, path in blobs if self._is_pinned(path))
        return CacheUsage(
            bytes=sum(size for _, size, _ in blobs), blobs=len(blobs), pinned_bytes=pinned, max_bytes=self.max_bytes
        )

    def trim(self, max_bytes: int | None = None) -> list[str]:
        """Evict least recently used, unpinned blobs until at most ``max_bytes`` (default: the bound) remain;
        returns the evicted sha256s (fewer than needed when the rest is pinned)."""
        with self._locked():
            return self._evict(self._total() - (self.max_bytes if max_bytes is None else max_bytes))

    def discard(self, digests: Iterable[str]) -> Discarded:
        """Delete these blobs (and the views that link them) now, e.g. the files of a forgotten source.

        Blobs not in the cache are skipped; blobs pinned by an open checkout are kept and reported."""
        wanted = sorted({check_sha256(d) for d in digests})
        removed: list[str] = []
        pinned: list[str] = []
        with self._locked():
            for digest in wanted:
                blob = self._blob(digest)
                if not blob.exists():
                    continue
                (removed if self._try_remove(blob) else pinned).append(digest)
            if removed:
                self._sweep_views()
        return Discarded(tuple(removed), tuple(pinned))

    # ------------------------------------------------------------------------------------------- fetching

    def _blob(self, digest: str) -> Path:
        return self._blobs / check_sha256(digest)

    def _acquire(self, uri: str, digest: str, size: int | None) -> tuple[BinaryIO, bool]:
        """An open, shared-locked (pinned) handle on the blob, and whether it was downloaded just now."""
        key = self.store.key_of(uri)  # refuses a URI outside the configured store
        for _ in range(_ATTEMPTS):
            with self._locked():
                handle = self._open_pinned(digest)
            if handle is not None:
                return handle, False
            tmp = self._download(key, uri, digest, size)
            try:
                with self._locked():
                    handle = self._open_pinned(digest)  # another process may have won the race
                    if handle is None:
                        self._insert(tmp, digest)
                        handle = self._open_pinned(digest)
            finally:
                tmp.unlink(missing_ok=True)
            if handle is not None:
                return handle, True
        raise StoreError(f"{uri}: its blob was evicted again right after each download; raise cache_max_bytes")

    def _download(self, key: str, uri: str, digest: str, size: int | None) -> Path:
        """Stream the object into tmp/, hashing as it arrives; IntegrityError (and nothing kept) on mismatch."""
        if size is not None and size > self.max_bytes:
            raise CacheFullError(
                f"{uri} ({size} bytes) is larger than the whole cache (cache_max_bytes = {self.max_bytes}); "
                "raise [artifacts] cache_max_bytes"
            )
        limit = self.max_bytes if size is None else size
        tmp = self._tmp / f"{digest}.{os.getpid()}.{uuid.uuid4().hex[:12]}"
        h, got_size = hashlib.sha256(), 0
        try:
            with open(tmp, "xb") as f:
                for chunk in self.store.stream(key):
                    got_size += len(chunk)
                    if got_size > limit:
                        if size is not None:
                            raise IntegrityError(
                                f"{uri} is larger than its recorded {size} bytes; the object was replaced or "
                                "corrupted in the store. It was not cached or decoded; re-upload the artifact."
                            )
                        raise CacheFullError(
                            f"{uri} is larger than the whole cache (cache_max_bytes = {self.max_bytes}); "
                            "raise [artifacts] cache_max_bytes"
                        )
                    h.update(chunk)
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            got = h.hexdigest()
            if got != digest:
                raise IntegrityError(
                    f"{uri}: sha256 {got[:16]}… does not match the recorded {digest[:16]}…; the object was "
                    "modified or corrupted in the store. It was not cached or decoded; re-upload or restore it."
                )
            if size is not None and got_size != size:
                raise IntegrityError(f"{uri}: {got_size} bytes, but {size} were recorded with its sha256")
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp

    def _insert(self, tmp: Path, digest: str) -> None:
        """Make room for ``tmp`` and rename it into blobs/ (caller holds the lock)."""
        size = tmp.stat().st_size
        over = self._total() + size - self.max_bytes
        if over > 0:
            self._evict(over)
            if self._total() + size > self.max_bytes:
                raise CacheFullError(
                    f"the artifact cache {self.root} cannot take {size} more bytes within cache_max_bytes = "
                    f"{self.max_bytes}: {self._pinned_total()} bytes are pinned by open compositions; raise "
                    "[artifacts] cache_max_bytes or close compositions"
                )
        tmp.chmod(0o444)
        blob = self._blob(digest)
        os.replace(tmp, blob)
        now = self._clock()
        os.utime(blob, (now, now))
        fsync_dir(self._blobs)

    def _open_pinned(self, digest: str) -> BinaryIO | None:
        """Open the blob with a shared lock and stamp its use; None if it is not cached (caller holds the lock)."""
        blob = self._blob(digest)
        try:
            handle = open(blob, "rb")  # noqa: SIM115 - returned to the caller, who closes it
        except FileNotFoundError:
            return None
        fcntl.flock(handle.fileno(), fcntl.LOCK_SH)
        now = self._clock()
        os.utime(blob, (now, now))
        return handle

    def _drop_corrupt(self, digest: str | None) -> None:
        if digest is None:
            return
        with self._locked():
            if self._try_remove(self._blob(digest)):
                self._sweep_views()
                return
        raise IntegrityError(
            f"cached blob {digest[:16]}… in {self.root} fails its sha256 but is in use by another composition; "
            "stop the readers and delete the cache directory"
        )

    # ------------------------------------------------------------------------------------------- views

    def _ensure_view(self, entries: Mapping[str, tuple[str, str, int]], handles: Mapping[str, BinaryIO]) -> Path:
        """views/<id> with hard links to the pinned blobs; rebuilt if any link is not the blob (caller holds
        the lock)."""
        spec = json.dumps(sorted((rel, digest) for rel, (_, digest, _) in entries.items()))
        view = self._views / hashlib.sha256(spec.encode()).hexdigest()[:32]
        if view.is_dir() and all(_same_file(view / rel, handles[rel]) for rel in entries):
            return view
        tmp = self._tmp / f"view.{os.getpid()}.{uuid.uuid4().hex[:12]}"
        try:
            for rel, (_, digest, _) in entries.items():
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                os.link(self._blob(digest), tmp / rel)
            if view.exists():
                shutil.rmtree(view)
            os.rename(tmp, view)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return view

    def _sweep_views(self) -> None:
        """Remove views that link an evicted blob (their files have no second link left)."""
        for view in self._views.iterdir():
            files = [p for p in view.rglob("*") if p.is_file()] if view.is_dir() else []
            if files and all(p.stat().st_nlink >= 2 for p in files):
                continue
            if view.is_dir():
                shutil.rmtree(view)
            else:
                view.unlink()

    # ------------------------------------------------------------------------------------------- eviction

    def _scan(self) -> list[tuple[float, int, Path]]:
        """(last use, size, path) of every blob."""
        out = []
        for path in self._blobs.iterdir():
            try:
                st = path.stat()
            except FileNotFoundError:
                continue  # removed between listing and stat (only by a process not holding the lock: a bug)
            out.append((st.st_mtime, st.st_size, path))
        return out

    def _total(self) -> int:
        return sum(size for _, size, _ in self._scan())

    def _pinned_total(self) -> int:
        return sum(size for _, size, path in self._scan() if self._is_pinned(path))

    def _evict(self, need: int) -> list[str]:
        """Remove LRU unpinned blobs until ``need`` bytes are freed (caller holds the lock)."""
        evicted: list[str] = []
        for _, size, path in sorted(self._scan()):
            if need <= 0:
                break
            if self._try_remove(path):
                need -= size
                evicted.append(path.name)
        if evicted:
            self._sweep_views()
        return evicted

    def _try_remove(self, blob: Path) -> bool:
        """Unlink ``blob`` unless a checkout holds it; True if removed (or already gone)."""
        try:
            handle = open(blob, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            return True
        with handle:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # pinned
            blob.unlink()
        return True

    def _is_pinned(self, blob: Path) -> bool:
        try:
            handle = open(blob, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            return False
        with handle:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
            return False

    # ------------------------------------------------------------------------------------------- plumbing

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.root / ".lock", "a") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            yield  # closing the file releases the lock

    def _remove_stale_tmp(self) -> None:
        """Delete temp files and views left by processes that died mid-download (caller holds the lock)."""
        for path in self._tmp.iterdir():
            parts = path.name.split(".")
            pid = int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None
            if pid is not None and pid_alive(pid):
                continue
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)


def _hash_handle(handle: BinaryIO) -> str:
    h, offset = hashlib.sha256(), 0
    while block := os.pread(handle.fileno(), CHUNK_BYTES, offset):
        h.update(block)
        offset += len(block)
    return h.hexdigest()


def _same_file(path: Path, handle: BinaryIO) -> bool:
    try:
        st = path.stat(follow_symlinks=False)
    except FileNotFoundError:
        return False
    held = os.fstat(handle.fileno())
    return (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino)
