"""The artifact store protocol: flat keys ("a/b/file.json") under one root URL, whatever the backend.

A key is a relative POSIX path of non-empty segments, never ``.``/``..``, so no backend can be asked for
something outside its root. Values are opaque bytes; integrity is the caller's (the registry records the
sha256 of every file; ``cdm.artifacts.cache`` verifies it before anything is decoded).
"""

from __future__ import annotations

import builtins
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from cdm.errors import StoreError
from cdm.fsio import CHUNK_BYTES as CHUNK_BYTES  # read/hash/stream granularity, for the backends
from cdm.fsio import sha256_file_size

MAX_KEY_BYTES = 1024  # S3's limit on an object key (UTF-8); the local backend enforces the same
_SHA256 = re.compile(r"[0-9a-f]{64}")
_BAD_KEY_CHARS = re.compile(r"[\x00-\x1f\x7f\\]")  # control characters and backslashes


class ObjectNotFoundError(StoreError):
    """The key has no object in the store."""


@dataclass(frozen=True)
class StoredFile:
    """One uploaded file as the registry records it."""

    uri: str  # where it lives: file:///abs/root/key or s3://bucket/prefix/key
    sha256: str  # hex digest of its bytes, checked before anything decodes them
    size: int  # bytes


@runtime_checkable
class ArtifactStore(Protocol):
    """Objects under one root URL. Writes are atomic: a reader sees the old object, the new one or none."""

    @property
    def root_url(self) -> str:
        """``file:///abs/dir`` or ``s3://bucket/prefix`` (no trailing slash)."""
        ...

    def url(self, key: str) -> str:
        """The URI of ``key`` (what the registry records)."""
        ...

    def key_of(self, uri: str) -> str:
        """The key of a URI made by ``url``; StoreError if the URI is outside this store's root."""
        ...

    def put_bytes(self, key: str, data: bytes) -> str:
        """Write ``data`` at ``key`` (replacing any object); returns its URI."""
        ...

    def put_file(self, key: str, path: Path) -> str:
        """Upload the file ``path`` to ``key`` (streamed; multipart when large); returns its URI."""
        ...

    def get_bytes(self, key: str) -> bytes:
        """The whole object (ObjectNotFoundError if missing)."""
        ...

    def get_file(self, key: str, dest: Path) -> int:
        """Download ``key`` to ``dest`` atomically (temp file + rename beside it); returns the byte count."""
        ...

    def stream(self, key: str) -> Iterator[bytes]:
        """The object in chunks, for hashing while downloading (ObjectNotFoundError if missing)."""
        ...

    def exists(self, key: str) -> bool: ...

    def list(self, prefix: str = "") -> list[str]:
        """Sorted keys below the directory ``prefix`` ("" = all; "a/b" lists "a/b/..." but not "a/bc")."""
        ...

    def delete(self, key: str, *, recursive: bool = False) -> builtins.list[str]:
        """Delete ``key`` (or, with ``recursive``, every key below it too); returns the URIs that existed."""
        ...


def check_key(key: str, *, allow_empty: bool = False) -> str:
    """``key`` itself if it is a safe relative POSIX path; StoreError naming the rule it breaks otherwise."""
    if not isinstance(key, str):
        raise StoreError(f"artifact key must be a string, got {type(key).__name__} {key!r}")
    if key == "" and allow_empty:
        return key
    if not key:
        raise StoreError("artifact key is empty; use a relative path such as 'compartments/alpha/manifest.json'")
    if len(key.encode("utf-8")) > MAX_KEY_BYTES:
        raise StoreError(f"artifact key {key[:60]!r}... is longer than {MAX_KEY_BYTES} bytes")
    if _BAD_KEY_CHARS.search(key):
        raise StoreError(f"artifact key {key!r} contains a control character or backslash; use '/' separators")
    if key.startswith("/"):
        raise StoreError(f"artifact key {key!r} is absolute; keys are relative to the store root")
    bad = [s for s in key.split("/") if s in ("", ".", "..")]
    if bad:
        raise StoreError(f"artifact key {key!r} has an empty, '.' or '..' segment; keys cannot leave the store root")
    return key


def check_sha256(digest: str) -> str:
    """``digest`` if it is a lowercase hex sha256; StoreError otherwise (it becomes a cache file name)."""
    if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
        raise StoreError(f"sha256 {digest!r} is not 64 lowercase hex digits")
    return digest


def join_key(*parts: str) -> str:
    """Join key segments with '/' (empty parts skipped) and check the result."""
    return check_key("/".join(p.strip("/") for p in parts if p.strip("/")))


def in_prefix(key: str, prefix: str) -> bool:
    """``key`` lies below the directory ``prefix`` ("" contains everything)."""
    return not prefix or key.startswith(prefix.rstrip("/") + "/")


def upload_directory(store: ArtifactStore, directory: Path, key_prefix: str) -> dict[str, StoredFile]:
    """Upload every regular file below ``directory`` to ``key_prefix/<relative path>``.

    Returns {relative POSIX path -> StoredFile(uri, sha256, size)} for the registry. ``manifest.json`` files
    are uploaded last, so a listing that shows a manifest shows a complete upload. Symlinks are refused (an
    artifact directory is plain files; a link could smuggle in a file from elsewhere).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise StoreError(f"cannot upload {directory}: not a directory")
    files: list[tuple[str, Path]] = []
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory).as_posix()
        if path.is_symlink():
            raise StoreError(f"cannot upload {path}: it is a symlink; artifact directories hold plain files only")
        if path.is_file():
            files.append((rel, path))
    if not files:
        raise StoreError(f"cannot upload {directory}: it holds no files")
    files.sort(key=lambda item: (item[1].name == "manifest.json", item[0]))
    out: dict[str, StoredFile] = {}
    for rel, path in files:
        digest, size = sha256_file_size(path)
        uri = store.put_file(join_key(key_prefix, rel), path)
        out[rel] = StoredFile(uri=uri, sha256=digest, size=size)
    return out


def stored_files_from_dict(raw: Mapping[str, Mapping[str, object]]) -> dict[str, StoredFile]:
    """Inverse of ``{rel: dataclasses.asdict(f)}`` with types checked (for records read back from JSON)."""
    out: dict[str, StoredFile] = {}
    for rel, item in raw.items():
        uri, digest, size = item.get("uri"), item.get("sha256"), item.get("size")
        if not isinstance(uri, str) or not isinstance(digest, str) or not isinstance(size, int):
            raise StoreError(f"file record {rel!r} needs uri (str), sha256 (str), size (int); got {dict(item)!r}")
        out[check_key(rel)] = StoredFile(uri=uri, sha256=check_sha256(digest), size=size)
    return out
