"""Artifacts as local files: safetensors + JSON, sha256 recorded on save and verified before loading.

Nothing here unpickles: weights are read as raw bytes, hashed, then decoded by safetensors.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import urllib.parse
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cdm.errors import CdmError, IntegrityError, StoreError
from cdm.fsio import fsync_dir, fsync_tree, sha256_file, write_atomic

if TYPE_CHECKING:  # torch is imported by the two tensor functions only: readers verify bytes without it
    import torch

MANIFEST = "manifest.json"
MAX_JSON_BYTES = 16 * 1024 * 1024  # largest JSON document read from an artifact (manifests are a few KiB)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hash_tree(directory: Path, *, exclude: tuple[str, ...] = (MANIFEST,)) -> dict[str, str]:
    """sha256 of every file below ``directory`` keyed by its relative POSIX path."""
    out: dict[str, str] = {}
    for p in sorted(directory.rglob("*")):
        if p.is_file() and p.name not in exclude:
            out[p.relative_to(directory).as_posix()] = sha256_file(p)
    return out


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (``cdm.fsio.write_atomic``), creating the directory when missing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True).encode())


def read_json(path: Path, *, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """Parse the JSON file ``path``, refusing one larger than ``max_bytes`` before reading it (StoreError)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > max_bytes:
                raise StoreError(
                    f"{path} is {size} bytes, over the {max_bytes}-byte limit for JSON read from an artifact; "
                    "the artifact is corrupt or not ours"
                )
            raw = f.read(max_bytes + 1)
    except FileNotFoundError as exc:
        raise StoreError(f"missing {path}; the artifact is incomplete or was deleted") from exc
    except IsADirectoryError as exc:
        raise StoreError(f"{path} is a directory, not a JSON file; the artifact is corrupt") from exc
    if len(raw) > max_bytes:  # grew while being read
        raise StoreError(f"{path} is over the {max_bytes}-byte limit for JSON read from an artifact")
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise StoreError(f"{path} is not valid JSON ({type(exc).__name__}: {exc}); the artifact is corrupt") from exc


def save_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Save a flat tensor dict as safetensors, atomically (``cdm.fsio.write_atomic``)."""
    from safetensors.torch import save as st_save

    data = st_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data)


def load_tensors(path: Path, *, expected_sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Read safetensors bytes, verify their sha256 when given, then decode (no pickle involved)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        raise StoreError(f"missing weights file {path}") from exc
    if expected_sha256 is not None:
        got = sha256_bytes(raw)
        if got != expected_sha256:
            raise IntegrityError(
                f"{path}: sha256 {got[:16]}… does not match the recorded {expected_sha256[:16]}…; "
                "the file was modified or corrupted. Retrain or restore the artifact; it will not be loaded."
            )
    from safetensors.torch import load as st_load

    return st_load(raw)


def verify_tree(directory: Path, expected: Mapping[str, str]) -> None:
    """Check every recorded file's sha256 (and that none is missing); raise IntegrityError otherwise."""
    for rel, want in expected.items():
        p = directory / rel
        if not p.is_file():
            raise IntegrityError(f"{p} is recorded in the manifest but missing; the artifact is incomplete")
        got = sha256_file(p)
        if got != want:
            raise IntegrityError(
                f"{p}: sha256 {got[:16]}… does not match the recorded {want[:16]}…; refusing to load a "
                "tampered or corrupted artifact. Retrain it or restore it from a good copy."
            )


@contextlib.contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield a fresh temp dir beside ``target``; on success everything in it is fsynced and it replaces ``target``
    in one rename (then the parent directory is fsynced), so a crash leaves the old directory or the new one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        yield tmp
        fsync_tree(tmp)
        old: Path | None = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}-{id(tmp)}"
            os.replace(target, old)
        os.replace(tmp, target)
        fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def artifact_uri(path: Path) -> str:
    """The URI recorded for a local artifact directory (``file:///abs/dir``)."""
    return path.resolve().as_uri()


def confined_path(uri: str, root: Path) -> Path:
    """The local path of a recorded artifact URI, resolved (symlinks included) and checked to lie below ``root``.

    Registry records are written by whoever can write Redis: a path taken from one is used only through this.
    Raises StoreError naming the URI and the root otherwise.
    """
    real_root = Path(root).resolve()
    path = artifact_path(uri)
    if not path.is_absolute():
        raise StoreError(f"artifact URI {uri!r} is not an absolute file:// URI; refusing it")
    real = path.resolve()
    if real != real_root and not real.is_relative_to(real_root):
        raise StoreError(
            f"artifact URI {uri!r} resolves to {real}, outside the artifact store {real_root}; refusing to read or "
            "delete it (check [artifacts] url and the registry's records)"
        )
    return real


def artifact_path(uri: str) -> Path:
    """A recorded artifact URI (``file:///abs/dir`` or a plain path) as a local path (not confined: see
    ``confined_path`` for paths taken from the registry)."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme in ("", "file"):
        return Path(urllib.parse.unquote(parsed.path if parsed.scheme else uri))
    raise CdmError(f"artifact URI {uri!r} has scheme {parsed.scheme!r}; only file:// artifacts can be loaded")


def remove_tree(path: Path) -> list[str]:
    """Delete a file or directory tree; return the files that were deleted (for forgetting receipts)."""
    if not path.exists():
        return []
    if path.is_file():
        path.unlink()
        return [str(path)]
    files = [str(p) for p in sorted(path.rglob("*")) if p.is_file()]
    shutil.rmtree(path)
    return files
