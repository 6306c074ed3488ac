"""Persisted artifacts: safetensors + JSON with sha256 recorded on save and verified before loading.

    files.py    local files: atomic writes, hashing, safetensors I/O, artifact URIs
"""

from cdm.artifacts.files import (
    MANIFEST,
    artifact_path,
    artifact_uri,
    atomic_directory,
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

__all__ = [
    "MANIFEST",
    "artifact_path",
    "artifact_uri",
    "atomic_directory",
    "fsync_dir",
    "hash_tree",
    "load_tensors",
    "read_json",
    "remove_tree",
    "save_tensors",
    "sha256_bytes",
    "sha256_file",
    "verify_tree",
    "write_json",
]
