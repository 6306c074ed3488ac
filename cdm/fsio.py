"""Durable local files: the one atomic write, directory fsyncs and file hash every package uses.

``write_atomic`` is the only way this project replaces a file: a crash (or power cut) at any point leaves the
old file or the new one, complete, never a mixture and never a vanished rename.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

CHUNK_BYTES = 1 << 20  # read size for hashing and streaming files


def write_atomic(path: Path, data: bytes | Callable[[BinaryIO], object], *, tmp_prefix: str | None = None) -> None:
    """Replace ``path`` with ``data`` (bytes, or a function writing to the open binary file).

    1. write a temp file in ``path``'s directory (named ``tmp_prefix`` + random, default ``.<name>.``, ending
       ``.tmp``), 2. fsync it, 3. rename it over ``path``, 4. fsync the directory, so the rename survives a power
       cut too. The temp file is removed when any step fails. The directory must exist.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=tmp_prefix or f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(data, bytes):
                f.write(data)
            else:
                data(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make the entries of ``directory`` (a rename, a new or deleted file) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(directory: Path) -> None:
    """fsync every file and folder below ``directory`` and the folder itself (files written by other code, e.g.
    diffusers' ``save_pretrained``, before the folder is renamed into place)."""
    for path in sorted(Path(directory).rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path.is_symlink():
            continue
        if path.is_dir():
            fsync_dir(path)
        elif path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(Path(directory))


def sha256_file_size(path: Path) -> tuple[str, int]:
    """(sha256 hex, size in bytes) of a file, read in chunks."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(CHUNK_BYTES):
            h.update(block)
            size += len(block)
    return h.hexdigest(), size


def sha256_file(path: Path) -> str:
    """sha256 hex of a file, read in chunks."""
    return sha256_file_size(path)[0]
