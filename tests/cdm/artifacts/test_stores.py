"""The store protocol on both backends: a local directory and the real S3 server (moto) through obstore."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from cdm.artifacts import ArtifactStore, DirectoryStore, ObjectNotFoundError, upload_directory
from cdm.artifacts.local import TMP_MARK
from cdm.errors import StoreError
from tests.cdm.artifacts.conftest import BACKENDS

both = pytest.mark.parametrize("store_config", BACKENDS, indirect=True)


@both
def test_put_get_exists_overwrite(store: ArtifactStore) -> None:
    uri = store.put_bytes("c/alpha/manifest.json", b'{"a": 1}')
    assert uri == store.url("c/alpha/manifest.json") and uri.startswith(store.root_url + "/")
    assert store.key_of(uri) == "c/alpha/manifest.json"
    assert store.get_bytes("c/alpha/manifest.json") == b'{"a": 1}'
    assert store.exists("c/alpha/manifest.json") and not store.exists("c/alpha") and not store.exists("c/beta")
    store.put_bytes("c/alpha/manifest.json", b"second")  # a put replaces the object whole
    assert store.get_bytes("c/alpha/manifest.json") == b"second"
    with pytest.raises(ObjectNotFoundError, match="no artifact"):
        store.get_bytes("c/missing")
    with pytest.raises(ObjectNotFoundError):
        store.stream("c/missing")


@both
def test_large_file_round_trip_streams_in_chunks(store: ArtifactStore, tmp_path: Path) -> None:
    """6 MiB: above obstore's 5 MiB multipart threshold on S3."""
    data = os.urandom(6 << 20)
    src = tmp_path / "w.safetensors"
    src.write_bytes(data)
    store.put_file("c/w.safetensors", src)
    dest = tmp_path / "out" / "w.safetensors"
    assert store.get_file("c/w.safetensors", dest) == len(data)
    assert dest.read_bytes() == data
    assert not [p for p in dest.parent.iterdir() if p != dest]  # no temp file left beside it
    chunks = list(store.stream("c/w.safetensors"))
    assert len(chunks) > 1 and b"".join(chunks) == data
    with pytest.raises(StoreError, match="no such file"):
        store.put_file("c/x", tmp_path / "absent")


@both
def test_list_is_by_directory_prefix(store: ArtifactStore) -> None:
    for key in ("a/1", "a/sub/2", "ab/3", "b"):
        store.put_bytes(key, key.encode())
    assert store.list() == ["a/1", "a/sub/2", "ab/3", "b"]
    assert store.list("a") == store.list("a/") == ["a/1", "a/sub/2"]  # not "ab/3"
    assert store.list("a/sub") == ["a/sub/2"]
    assert store.list("a/1") == []  # a key is not a directory
    assert store.list("zzz") == []


@both
def test_delete_reports_what_existed(store: ArtifactStore) -> None:
    for key in ("c/alpha/manifest.json", "c/alpha/unet/w", "c/beta/manifest.json"):
        store.put_bytes(key, b"x")
    assert store.delete("c/alpha/manifest.json") == [store.url("c/alpha/manifest.json")]
    assert store.delete("c/alpha/manifest.json") == []  # gone already: nothing to report
    assert store.delete("c/alpha", recursive=True) == [store.url("c/alpha/unet/w")]
    assert store.list() == ["c/beta/manifest.json"]
    assert store.delete("c/none", recursive=True) == []


@both
@pytest.mark.parametrize("key", ["", "../x", "/abs", "a//b", "a/./b", "a/../../b", "a\\b", "a\x00b", "x" * 1025])
def test_unsafe_keys_are_refused(store: ArtifactStore, key: str) -> None:
    with pytest.raises(StoreError, match="artifact key"):
        store.put_bytes(key, b"x")
    with pytest.raises(StoreError, match="artifact key"):
        store.get_bytes(key)


@both
def test_foreign_uris_are_refused(store: ArtifactStore) -> None:
    root = store.root_url
    for uri in (f"{root}-evil/x", "file:///etc/passwd", "s3://another-bucket/artifacts/x", f"{root}/../x"):
        with pytest.raises(StoreError):
            store.key_of(uri)


@both
def test_upload_directory_records_uri_sha_size(store: ArtifactStore, tmp_path: Path) -> None:
    art = tmp_path / "alpha"
    (art / "unet").mkdir(parents=True)
    (art / "unet" / "config.json").write_text('{"sample_size": 8}')
    (art / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(os.urandom(3000))
    (art / "manifest.json").write_text('{"name": "alpha"}')
    files = upload_directory(store, art, "compartments/alpha")
    assert sorted(files) == ["manifest.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors"]
    for rel, stored in files.items():
        data = (art / rel).read_bytes()
        assert stored.uri == store.url(f"compartments/alpha/{rel}")
        assert stored.sha256 == hashlib.sha256(data).hexdigest() and stored.size == len(data)
        assert store.get_bytes(store.key_of(stored.uri)) == data


def test_upload_puts_manifest_last_and_refuses_symlinks(tmp_path: Path) -> None:
    order: list[str] = []

    class Recording(DirectoryStore):
        def put_file(self, key: str, path: Path) -> str:
            order.append(key)
            return super().put_file(key, path)

    art = tmp_path / "art"
    (art / "unet").mkdir(parents=True)
    for rel in ("manifest.json", "a.json", "unet/z.bin"):
        (art / rel).write_bytes(b"x")
    upload_directory(Recording(tmp_path / "store"), art, "p")
    assert order[-1] == "p/manifest.json" and sorted(order) == ["p/a.json", "p/manifest.json", "p/unet/z.bin"]
    (art / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(StoreError, match="symlink"):
        upload_directory(Recording(tmp_path / "store"), art, "p")
    with pytest.raises(StoreError, match="no files"):
        (tmp_path / "empty").mkdir()
        upload_directory(Recording(tmp_path / "store"), tmp_path / "empty", "p")


def test_local_writes_are_atomic_and_stay_inside_the_root(local_store: DirectoryStore, tmp_path: Path) -> None:
    local_store.put_bytes("a/b", b"1")
    (local_store.root / "a" / f".b{TMP_MARK}123").write_bytes(b"half")  # a writer that died mid-write
    assert local_store.list() == ["a/b"]
    outside = tmp_path / "outside"
    outside.mkdir()
    (local_store.root / "escape").symlink_to(outside)
    with pytest.raises(StoreError, match="outside the store root"):
        local_store.put_bytes("escape/x", b"nope")
    assert not (outside / "x").exists()
    local_store.delete("a/b")
    assert not (local_store.root / "a" / "b").exists()
    with pytest.raises(StoreError, match="absolute"):
        DirectoryStore("relative/dir")
