"""A writer uploads a real compartment; a reader in another working directory, with its own cache, fetches,
verifies and loads it, and refuses a tampered copy before anything decodes it."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from cdm.artifacts import ArtifactsConfig, ArtifactStore, StoredFile, upload_directory
from cdm.compartment import WEIGHTS, Compartment, build_unet, new_manifest
from cdm.config import TrainConfig
from tests.cdm.artifacts.conftest import BACKENDS
from tests.cdm.conftest import TINY_MODEL

READER = """
import json, sys
from cdm.artifacts import ArtifactsConfig, open_cache, open_store, stored_files_from_dict

cfg = ArtifactsConfig(**json.loads(sys.argv[1]))
files = stored_files_from_dict(json.loads(sys.argv[2]))
cache = open_cache(cfg, open_store(cfg, environ={}))  # relative cache_dir: below this process's cwd
try:
    checkout = cache.checkout(files)
except Exception as exc:
    decoders = sorted(m for m in ("torch", "safetensors", "diffusers") if m in sys.modules)
    print(json.dumps({"error": type(exc).__name__, "message": str(exc), "decoders_loaded": decoders}))
    raise SystemExit(0)
with checkout:
    import torch
    from cdm.compartment import Compartment

    comp = Compartment.load(checkout.path, expected_sha256=json.loads(sys.argv[3]))
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    out = comp(x, torch.tensor([10, 500]), torch.tensor([1, 2]))
    print(json.dumps({"cache_root": str(cache.root), "view": str(checkout.path), "out": out.flatten().tolist()}))
"""


def run_reader(cwd: Path, config: ArtifactsConfig, files: dict[str, StoredFile], manifest_sha: dict[str, str]) -> Any:
    cwd.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            READER,
            json.dumps(dataclasses.asdict(config)),
            json.dumps({rel: dataclasses.asdict(f) for rel, f in files.items()}),
            json.dumps(manifest_sha),
        ],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if not k.startswith("AWS_")},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.fixture
def uploaded(store: ArtifactStore, tmp_path: Path) -> tuple[Compartment, dict[str, StoredFile]]:
    """A tiny compartment saved in the writer's directory and uploaded from there."""
    writer = tmp_path / "writer"
    torch.manual_seed(0)
    manifest = new_manifest(
        "alpha", fingerprint="f" * 64, n_samples=1, class_counts=[1] * 10, num_classes=10, model=TINY_MODEL,
        train=TrainConfig(),
    )  # fmt: skip
    comp = Compartment(build_unet(TINY_MODEL, 10), manifest).eval()
    comp.save(writer / "alpha")
    return comp, upload_directory(store, writer / "alpha", "compartments/alpha")


@pytest.mark.slow
@pytest.mark.services
@pytest.mark.parametrize("store_config", ["s3"], indirect=True)  # the reader imports torch + diffusers: ~5 s a run
def test_reader_elsewhere_loads_what_the_writer_uploaded(
    uploaded: tuple[Compartment, dict[str, StoredFile]], store_config: ArtifactsConfig, tmp_path: Path
) -> None:
    comp, files = uploaded
    assert sorted(files) == ["manifest.json", "unet/config.json", WEIGHTS]
    config = dataclasses.replace(store_config, cache_dir=".cache/artifacts")
    result = run_reader(tmp_path / "reader", config, files, comp.manifest.sha256)
    assert Path(result["cache_root"]) == (tmp_path / "reader" / ".cache" / "artifacts").resolve()
    assert Path(result["view"]).is_relative_to(result["cache_root"])
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = comp(x, torch.tensor([10, 500]), torch.tensor([1, 2])).flatten()
    torch.testing.assert_close(torch.tensor(result["out"]), expected, rtol=0, atol=0)


@pytest.mark.parametrize("store_config", BACKENDS, indirect=True)
def test_reader_refuses_tampered_weights_without_decoding(
    uploaded: tuple[Compartment, dict[str, StoredFile]],
    store: ArtifactStore,
    store_config: ArtifactsConfig,
    tmp_path: Path,
) -> None:
    comp, files = uploaded
    key = store.key_of(files[WEIGHTS].uri)
    weights = bytearray(store.get_bytes(key))
    weights[-1] ^= 0xFF  # one flipped bit in the last tensor: still valid safetensors, different weights
    store.put_bytes(key, bytes(weights))
    config = dataclasses.replace(store_config, cache_dir=".cache/artifacts")
    result = run_reader(tmp_path / "reader", config, files, comp.manifest.sha256)
    assert result["error"] == "IntegrityError" and "does not match the recorded" in result["message"]
    assert result["decoders_loaded"] == []  # neither torch nor safetensors was even imported
    blobs = tmp_path / "reader" / ".cache" / "artifacts" / "blobs"
    assert files[WEIGHTS].sha256 not in {p.name for p in blobs.iterdir()}
