"""The readers' content-addressed cache, on both backends (a local directory and the real S3 server)."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cdm.artifacts import (
    ArtifactCache,
    ArtifactsConfig,
    ArtifactStore,
    CacheFullError,
    Discarded,
    PathOutsideCacheError,
    StoredFile,
)
from cdm.errors import IntegrityError, StoreError
from tests.cdm.artifacts.conftest import BACKENDS

both = pytest.mark.parametrize("store_config", BACKENDS, indirect=True)


def put(store: ArtifactStore, key: str, data: bytes) -> StoredFile:
    return StoredFile(store.put_bytes(key, data), hashlib.sha256(data).hexdigest(), len(data))


def blobs(cache: ArtifactCache) -> set[str]:
    return {p.name for p in (cache.root / "blobs").iterdir()}


def leftovers(cache: ArtifactCache) -> list[Path]:
    return list((cache.root / "tmp").iterdir())


class Clock:
    """A clock that ticks once per reading: each use of a blob gets a later stamp (a deterministic LRU)."""

    def __init__(self) -> None:
        self._ticks = itertools.count(1_000_000)

    def __call__(self) -> float:
        return float(next(self._ticks))


@both
def test_checkout_lays_out_verified_pinned_files(store: ArtifactStore, tmp_path: Path) -> None:
    files = {"manifest.json": put(store, "c/a/manifest.json", b"{}"), "unet/w": put(store, "c/a/unet/w", b"w" * 5000)}
    cache = ArtifactCache(tmp_path / "cache", store, 1 << 20)
    with cache.checkout(files) as co:
        assert (co.path / "manifest.json").read_bytes() == b"{}"
        assert (co.path / "unet" / "w").read_bytes() == b"w" * 5000
        assert co.read("unet/w") == b"w" * 5000
        assert all(cache.resolve(p) == p for p in co.files.values())
        assert blobs(cache) == {f.sha256 for f in files.values()}
        usage = cache.usage()
        assert (usage.bytes, usage.blobs, usage.pinned_bytes) == (5002, 2, 5002)
        again = cache.checkout(files)  # a second reader of the same artifact shares the view
        assert again.path == co.path
        again.close()
    assert co.closed and cache.usage().pinned_bytes == 0
    with pytest.raises(StoreError, match="closed"):
        co.read("unet/w")
    assert cache.read_verified(files["unet/w"].uri, files["unet/w"].sha256) == b"w" * 5000
    assert not leftovers(cache)


@both
@pytest.mark.parametrize("tamper", ["same size", "longer"])
def test_tampered_object_is_refused_before_anything_keeps_it(store: ArtifactStore, tmp_path: Path, tamper: str) -> None:
    good = b"\x08\x00\x00\x00\x00\x00\x00\x00{}      " + bytes(range(256)) * 8
    recorded = put(store, "c/a/unet/w.safetensors", good)
    bad = bytes([good[0] ^ 1]) + good[1:] if tamper == "same size" else good + b"\x00" * 4096
    store.put_bytes("c/a/unet/w.safetensors", bad)  # replaced behind the registry's back
    cache = ArtifactCache(tmp_path / "cache", store, 1 << 20)
    match = "does not match the recorded" if tamper == "same size" else "larger than its recorded"
    with pytest.raises(IntegrityError, match=match):
        cache.checkout({"unet/w.safetensors": recorded})
    assert not blobs(cache) and not leftovers(cache) and not list((cache.root / "views").iterdir())


@both
def test_lru_eviction_keeps_pinned_blobs(store: ArtifactStore, tmp_path: Path) -> None:
    a, b, c, d, e = (put(store, f"k/{n}", n.encode() * 1000) for n in "abcde")
    cache = ArtifactCache(tmp_path / "cache", store, 3000, clock=Clock())
    pinned = cache.checkout({"a": a})  # oldest use of all, but in use
    cache.fetch(b.uri, b.sha256)
    cache.fetch(c.uri, c.sha256)
    cache.fetch(b.uri, b.sha256)  # b used again: c is now the least recent unpinned
    cache.fetch(d.uri, d.sha256)
    assert blobs(cache) == {a.sha256, b.sha256, d.sha256}  # c evicted; a kept although least recently used
    assert cache.usage().bytes == 3000
    view = pinned.path
    pinned.close()
    cache.fetch(e.uri, e.sha256)  # now a is evictable and the least recent
    assert blobs(cache) == {b.sha256, d.sha256, e.sha256}
    assert not view.exists()  # the view of an evicted blob goes with it
    assert cache.trim(1000) == [b.sha256, d.sha256] and blobs(cache) == {e.sha256}


@both
def test_full_cache_of_pinned_blobs_refuses_more(store: ArtifactStore, tmp_path: Path) -> None:
    a, b, c = (put(store, f"k/{n}", n.encode() * 1000) for n in "abc")
    cache = ArtifactCache(tmp_path / "cache", store, 2500)
    with cache.checkout({"a": a, "b": b}), pytest.raises(CacheFullError, match="2000 bytes are pinned"):
        cache.fetch(c.uri, c.sha256)
    assert blobs(cache) == {a.sha256, b.sha256} and not leftovers(cache)
    big = put(store, "k/big", b"x" * 3000)
    with pytest.raises(CacheFullError, match="larger than the whole cache"):
        cache.fetch(big.uri, big.sha256)  # size unknown: stopped while streaming
    with pytest.raises(CacheFullError, match=r"\(3000 bytes\) is larger than the whole cache"):
        cache.fetch(big.uri, big.sha256, size=big.size)  # size recorded: refused before downloading
    with pytest.raises(CacheFullError, match="raise \\[artifacts\\] cache_max_bytes"):
        cache.checkout({"a": a, "b": b, "c": c})  # one composition bigger than the bound
    assert not leftovers(cache)


def test_discard_deletes_the_listed_blobs_unless_pinned(local_store: ArtifactStore, tmp_path: Path) -> None:
    """A forgotten source's files leave the cache at once; a file still in use stays and is reported."""
    a, b, c = (put(local_store, f"k/{n}", n.encode() * 100) for n in "abc")
    cache = ArtifactCache(tmp_path / "cache", local_store, 1 << 20)
    with cache.checkout({"a": a}) as in_use:
        view = cache.checkout({"b": b, "c": c})
        view_path = view.path
        view.close()
        done = cache.discard([b.sha256, a.sha256, "d" * 64])
        assert done == Discarded(removed=(b.sha256,), pinned=(a.sha256,))
        assert blobs(cache) == {a.sha256, c.sha256} and not view_path.exists()  # the view linking b went too
        assert (in_use.path / "a").read_bytes() == b"a" * 100
    assert cache.discard([a.sha256]) == Discarded(removed=(a.sha256,), pinned=())
    with pytest.raises(StoreError, match="not 64 lowercase hex"):
        cache.discard(["../x"])


def test_corrupt_cached_blob_is_dropped_and_fetched_again(local_store: ArtifactStore, tmp_path: Path) -> None:
    f = put(local_store, "k/w", b"weights" * 100)
    cache = ArtifactCache(tmp_path / "cache", local_store, 1 << 20)
    blob = cache.fetch(f.uri, f.sha256)
    blob.chmod(0o644)
    blob.write_bytes(b"bit rot" * 100)  # same name, wrong content (disk error or tampering in the cache)
    with cache.checkout({"w": f}) as co:
        assert co.read("w") == b"weights" * 100 and blob.read_bytes() == b"weights" * 100
    blob.chmod(0o644)
    blob.write_bytes(b"bit rot" * 100)
    assert cache.read_verified(f.uri, f.sha256) == b"weights" * 100


def test_paths_outside_the_cache_are_refused(local_store: ArtifactStore, tmp_path: Path) -> None:
    f = put(local_store, "k/w", b"w")
    cache = ArtifactCache(tmp_path / "cache", local_store, 1 << 20)
    blob = cache.fetch(f.uri, f.sha256)
    assert cache.resolve(blob) == blob and cache.resolve(f"blobs/{f.sha256}") == blob
    secret = tmp_path / "secret.safetensors"
    secret.write_bytes(b"not from the store")
    (cache.root / "views" / "planted").symlink_to(secret)
    for path in ("../secret.safetensors", secret, cache.root / "views" / "planted", "/etc/passwd"):
        with pytest.raises(PathOutsideCacheError, match="outside the artifact cache"):
            cache.resolve(path)
    with pytest.raises(StoreError, match="does not exist"):
        cache.resolve("blobs/absent")
    with pytest.raises(StoreError, match="64 lowercase hex"):
        cache.fetch(f.uri, "../../../etc/passwd")  # a sha256 becomes a file name: only hex is accepted
    with pytest.raises(StoreError, match="outside this store"):
        cache.fetch((tmp_path / "secret.safetensors").as_uri(), f.sha256)  # the registry cannot point elsewhere
    with pytest.raises(StoreError, match="artifact key"):
        cache.checkout({"../escape": f})


def test_dead_downloads_are_cleaned_on_open(local_store: ArtifactStore, tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path / "cache", local_store, 1 << 20)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = cache.root / "tmp" / f"{'0' * 64}.{int(dead.stdout)}.abc"
    live = cache.root / "tmp" / f"{'1' * 64}.{os.getpid()}.abc"
    stale.write_bytes(b"half")
    live.write_bytes(b"in progress")
    ArtifactCache(tmp_path / "cache", local_store, 1 << 20)
    assert not stale.exists() and live.exists()


_FETCH_SCRIPT = """
import json, os, sys, time
from pathlib import Path
from cdm.artifacts import ArtifactCache, ArtifactsConfig, open_store, stored_files_from_dict
cfg = ArtifactsConfig(**json.loads(sys.argv[1]))
files = stored_files_from_dict(json.loads(sys.argv[2]))
cache = ArtifactCache(Path(sys.argv[3]), open_store(cfg, environ={}), 64 << 20)
go = Path(sys.argv[4])
while not go.exists():
    time.sleep(0.005)
with cache.checkout(files) as co:
    data = co.read("w")
    print(json.dumps({"ino": os.stat(co.files["w"]).st_ino, "ok": len(data) == files["w"].size}))
"""


@both
def test_two_processes_fetch_the_same_blob(store: ArtifactStore, store_config: ArtifactsConfig, tmp_path: Path) -> None:
    data = os.urandom(4 << 20)
    files = {"w": put(store, "k/w", data)}
    cache_root, go = tmp_path / "shared-cache", tmp_path / "go"
    args = [
        json.dumps(store_config.__dict__),
        json.dumps({rel: f.__dict__ for rel, f in files.items()}),
        str(cache_root),
        str(go),
    ]
    procs = [
        subprocess.Popen([sys.executable, "-c", _FETCH_SCRIPT, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    time.sleep(0.3)  # both past their imports, waiting
    go.touch()
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err.decode()[-2000:] for _, err in outs]
    results = [json.loads(out) for out, _ in outs]
    assert all(r["ok"] for r in results) and results[0]["ino"] == results[1]["ino"]  # one blob, shared
    assert {p.name for p in (cache_root / "blobs").iterdir()} == {files["w"].sha256}
    assert not list((cache_root / "tmp").iterdir())  # the loser's download was discarded
