"""Persisted artifacts: safetensors + JSON with sha256 recorded on save and verified before loading, kept in an
artifact store that any host can read.

    files.py    local files: atomic writes, hashing, safetensors I/O, artifact URIs
    store.py    the ArtifactStore protocol, StoredFile (uri, sha256, size), upload_directory
    local.py    file:///abs/dir backend (DirectoryStore)        s3.py   s3://bucket/prefix backend (obstore)
    cache.py    the reader's verified, content-addressed, size-bounded LRU cache (pins while in use)
    config.py   the ``[artifacts]`` section (ArtifactsConfig)

``open_store(config)`` picks the backend from ``[artifacts] url``: ``file:///abs/dir`` (a local directory, the
default) or ``s3://bucket/prefix`` (any S3-compatible object store). Writers upload an artifact directory with
``upload_directory`` and record ``{relative path: StoredFile(uri, sha256, size)}``; readers
``ArtifactCache(...).checkout(files)`` to get the same files, verified and pinned, in a local directory.
Importing this package does not import torch (safetensors I/O imports it when called).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from cdm.artifacts.cache import (
    ArtifactCache,
    CacheFullError,
    CacheUsage,
    Checkout,
    Discarded,
    PathOutsideCacheError,
)
from cdm.artifacts.config import ArtifactsConfig
from cdm.artifacts.files import (
    MANIFEST,
    MAX_JSON_BYTES,
    artifact_path,
    artifact_uri,
    atomic_directory,
    confined_path,
    fsync_dir,
    hash_tree,
    load_tensors,
    read_json,
    remove_tree,
    save_tensors,
    sha256_bytes,
    sha256_file,
    verify_tree,
    write_json,
)
from cdm.artifacts.local import DirectoryStore
from cdm.artifacts.store import (
    ArtifactStore,
    ObjectNotFoundError,
    StoredFile,
    check_key,
    check_sha256,
    stored_files_from_dict,
    upload_directory,
)
from cdm.errors import ConfigError

__all__ = [
    "MANIFEST",
    "MAX_JSON_BYTES",
    "ArtifactCache",
    "ArtifactStore",
    "ArtifactsConfig",
    "CacheFullError",
    "CacheUsage",
    "Checkout",
    "DirectoryStore",
    "Discarded",
    "ObjectNotFoundError",
    "PathOutsideCacheError",
    "StoredFile",
    "artifact_path",
    "artifact_uri",
    "atomic_directory",
    "check_key",
    "check_sha256",
    "confined_path",
    "fsync_dir",
    "hash_tree",
    "load_tensors",
    "open_cache",
    "open_store",
    "read_json",
    "remove_tree",
    "save_tensors",
    "sha256_bytes",
    "sha256_file",
    "stored_files_from_dict",
    "upload_directory",
    "verify_tree",
    "write_json",
]


def open_store(
    config: ArtifactsConfig, *, default_dir: Path | None = None, environ: Mapping[str, str] | None = None
) -> ArtifactStore:
    """The store ``config.url`` names.

    Args:
        config: the ``[artifacts]`` section.
        default_dir: the local directory used when ``config.url`` is "" (the daemon's artifact directory).
        environ: where AWS_* variables are read for settings the config leaves empty (default os.environ).
    """
    if config.scheme == "s3":
        from cdm.artifacts.s3 import S3ObjectStore, resolve_settings  # obstore loads only when S3 is used

        return S3ObjectStore(config.url, resolve_settings(config, environ))
    if config.scheme == "file":
        return DirectoryStore.from_url(config.url)
    if default_dir is None:
        raise ConfigError("artifacts.url is empty and no local artifact directory was given; set [artifacts] url")
    return DirectoryStore(Path(default_dir).resolve())


def open_cache(config: ArtifactsConfig, store: ArtifactStore, *, base_dir: Path | None = None) -> ArtifactCache:
    """The reader's cache of ``config`` (a relative ``cache_dir`` is taken from ``base_dir``, default the cwd)."""
    root = Path(config.cache_dir)
    if not root.is_absolute():
        root = (base_dir or Path.cwd()) / root
    return ArtifactCache(root, store, config.cache_max_bytes)
