"""cdm.fsio: the one atomic write (temp + fsync + rename + directory fsync) and the one file hash."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import BinaryIO

import pytest

from cdm import fsio


def test_write_atomic_replaces_and_syncs_the_file_and_its_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(fsio.os, "fsync", fsync)
    fsio.write_atomic(target, b"new")
    assert target.read_bytes() == b"new"
    assert synced == ["file", "dir"]  # the data before the rename, the rename after it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_write_atomic_takes_a_writer_and_a_temp_prefix(tmp_path: Path) -> None:
    seen: list[str] = []

    def write(f: BinaryIO) -> None:
        seen.append(Path(os.readlink(f"/proc/self/fd/{f.fileno()}")).name)
        f.write(b"a")
        f.write(b"b")

    fsio.write_atomic(tmp_path / "g", write, tmp_prefix=".tmp-")
    assert (tmp_path / "g").read_bytes() == b"ab"
    assert len(seen) == 1 and seen[0].startswith(".tmp-") and seen[0].endswith(".tmp")


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "f.json"
    target.write_bytes(b"old")

    def half(f: BinaryIO) -> None:
        f.write(b"ne")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        fsio.write_atomic(target, half)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]


def test_sha256_file_matches_hashlib_across_chunks(tmp_path: Path) -> None:
    data = os.urandom(fsio.CHUNK_BYTES + 123)
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert fsio.sha256_file_size(path) == (hashlib.sha256(data).hexdigest(), len(data))
    assert fsio.sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_atomic_directory_syncs_every_file_and_folder_before_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cdm.artifacts import atomic_directory

    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    target = tmp_path / "artifact"
    with atomic_directory(target) as tmp:
        (tmp / "unet").mkdir()
        (tmp / "unet" / "weights.bin").write_bytes(b"w")  # written without fsync, as save_pretrained does
        (tmp / "manifest.json").write_bytes(b"{}")
        monkeypatch.setattr(fsio.os, "fsync", fsync)
    names = [Path(p).name for p in synced]
    assert set(names[:4]) == {"weights.bin", "manifest.json", "unet", tmp.name}  # the whole tree, deepest first
    assert names[-1] == tmp_path.name  # the rename itself, last
    assert (target / "unet" / "weights.bin").read_bytes() == b"w" and not tmp.exists()
