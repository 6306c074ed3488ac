"""``file:///abs/dir``: artifacts as files below one local directory (the default backend, as today).

Every write is ``cdm.fsio.write_atomic`` (temp file in the target's directory, fsync, rename, directory fsync), so a
reader sees the old file, the new one, or nothing. Temp files carry ``TMP_MARK`` and are never listed.
"""

from __future__ import annotations

import builtins
import contextlib
import os
import shutil
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from cdm.artifacts.store import CHUNK_BYTES, ObjectNotFoundError, check_key, in_prefix
from cdm.errors import StoreError
from cdm.fsio import write_atomic

TMP_MARK = ".cdm-tmp-"  # in the names of files being written; skipped by list()


def file_url_path(url: str) -> Path:
    """The absolute directory of a ``file:///abs/dir`` URL (StoreError for anything else)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "file" or parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
        raise StoreError(f"{url!r} is not a local file URL; use file:///absolute/directory")
    path = urllib.parse.unquote(parts.path)
    if not path.startswith("/"):
        raise StoreError(f"{url!r} has a relative path; use file:///absolute/directory")
    return Path(path)


class DirectoryStore:
    """An ArtifactStore over a local directory (created on the first write)."""

    def __init__(self, root: Path | str) -> None:
        root = Path(root)
        if not root.is_absolute():
            raise StoreError(f"local artifact root {str(root)!r} must be an absolute path")
        self.root = Path(os.path.normpath(root))
        self._root_url = self.root.as_uri()

    def __repr__(self) -> str:
        return f"DirectoryStore({str(self.root)!r})"

    @classmethod
    def from_url(cls, url: str) -> DirectoryStore:
        return cls(file_url_path(url))

    @property
    def root_url(self) -> str:
        return self._root_url

    # ------------------------------------------------------------------------------------------- keys

    def url(self, key: str) -> str:
        return self._path(key).as_uri()

    def key_of(self, uri: str) -> str:
        path = file_url_path(uri)
        try:
            rel = Path(os.path.normpath(path)).relative_to(self.root)
        except ValueError:
            raise StoreError(f"{uri!r} is outside this store ({self.root_url}); check [artifacts] url") from None
        return check_key(rel.as_posix())

    def _path(self, key: str) -> Path:
        """The file of ``key``; refuses keys that would resolve (through symlinks) outside the root."""
        path = self.root / check_key(key)
        real_root = self.root.resolve()
        if not path.resolve().is_relative_to(real_root):
            raise StoreError(f"artifact key {key!r} resolves to {path.resolve()}, outside the store root {real_root}")
        return path

    # ------------------------------------------------------------------------------------------- writes

    def put_bytes(self, key: str, data: bytes) -> str:
        path = self._path(key)
        self._atomic_write(path, data)
        return path.as_uri()

    def put_file(self, key: str, path: Path) -> str:
        target = self._path(key)
        try:
            with open(path, "rb") as src:
                self._atomic_write(target, lambda f: shutil.copyfileobj(src, f, CHUNK_BYTES))
        except FileNotFoundError:
            raise StoreError(f"cannot upload {path}: no such file") from None
        return target.as_uri()

    def _atomic_write(self, path: Path, data: bytes | Callable[[BinaryIO], object]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, data, tmp_prefix=f".{path.name}{TMP_MARK}")

    # ------------------------------------------------------------------------------------------- reads

    def get_bytes(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            raise ObjectNotFoundError(f"no artifact {self.url(key)}") from None

    def stream(self, key: str) -> Iterator[bytes]:
        path = self._path(key)
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed by the generator below
        except (FileNotFoundError, IsADirectoryError):
            raise ObjectNotFoundError(f"no artifact {path.as_uri()}") from None
        return _chunks(f)

    def get_file(self, key: str, dest: Path) -> int:
        chunks = self.stream(key)
        size = 0

        def write(f: BinaryIO) -> None:
            nonlocal size
            for chunk in chunks:
                f.write(chunk)
                size += len(chunk)

        self._atomic_write(Path(dest), write)
        return size

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        prefix = check_key(prefix.rstrip("/"), allow_empty=True)
        base = self._path(prefix) if prefix else self.root
        if not base.is_dir():
            return []
        keys = []
        for dirpath, _dirs, names in os.walk(base):
            for name in names:
                if TMP_MARK in name:
                    continue
                key = (Path(dirpath) / name).relative_to(self.root).as_posix()
                if in_prefix(key, prefix):
                    keys.append(key)
        return sorted(keys)

    # ------------------------------------------------------------------------------------------- deletes

    def delete(self, key: str, *, recursive: bool = False) -> builtins.list[str]:
        keys = ([key] if self._path(key).is_file() else []) + (self.list(key) if recursive else [])
        deleted = []
        for k in keys:
            path = self._path(k)
            with contextlib.suppress(FileNotFoundError):  # deleted concurrently: not ours to report
                path.unlink()
                deleted.append(path.as_uri())
            self._prune_empty_dirs(path.parent)
        return deleted

    def _prune_empty_dirs(self, directory: Path) -> None:
        """Remove now-empty directories from ``directory`` up to (not including) the root."""
        while directory != self.root and directory.is_relative_to(self.root):
            try:
                directory.rmdir()
            except OSError:  # not empty (or already gone): stop climbing
                return
            directory = directory.parent


def _chunks(f: BinaryIO) -> Iterator[bytes]:
    with f:
        while block := f.read(CHUNK_BYTES):
            yield block
