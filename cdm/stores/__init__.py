"""Artifact stores behind one protocol, and the readers' verified local cache.

``open_store(config)`` picks the backend from ``[artifacts] url``: ``file:///abs/dir`` (a local directory,
the default) or ``s3://bucket/prefix`` (any S3-compatible object store). Writers upload an artifact
directory with ``upload_directory`` and record ``{relative path: StoredFile(uri, sha256, size)}``; readers
``ArtifactCache(...).checkout(files)`` to get the same files, verified and pinned, in a local directory.

(Temporary home: this package moves into ``cdm/artifacts/`` at merge.)
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from cdm.errors import ConfigError
from cdm.stores.base import (
    ArtifactStore,
    ObjectNotFoundError,
    StoredFile,
    check_key,
    check_sha256,
    stored_files_from_dict,
    upload_directory,
)
from cdm.stores.cache import ArtifactCache, CacheFullError, CacheUsage, Checkout, PathOutsideCacheError
from cdm.stores.config import ArtifactsConfig
from cdm.stores.local import DirectoryStore

__all__ = [
    "ArtifactCache",
    "ArtifactStore",
    "ArtifactsConfig",
    "CacheFullError",
    "CacheUsage",
    "Checkout",
    "DirectoryStore",
    "ObjectNotFoundError",
    "PathOutsideCacheError",
    "StoredFile",
    "check_key",
    "check_sha256",
    "open_cache",
    "open_store",
    "stored_files_from_dict",
    "upload_directory",
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
        from cdm.stores.s3 import S3ObjectStore, resolve_settings  # obstore loads only when S3 is used

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
