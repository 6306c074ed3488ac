"""``cdm attribute IMAGE``: P(source | image), offline (--store, the learnt kind's router) and against a registry
(--redis, either routing kind: the router's posterior, or the compartments' ELBOs for the density kind)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import redis
from PIL import Image

from cdm.store import LocalStore
from cli import main
from registry.keys import Keys
from registry.writer import Registry
from tests.api.conftest import MODEL, ROUTER, TRAIN, Trained, digit_sources, register


def write_png(path: Path, source_image: np.ndarray) -> Path:
    if source_image.ndim == 3 and source_image.shape[-1] == 1:
        source_image = source_image[..., 0]
    Image.fromarray(source_image).resize((20, 20)).save(path)  # any size: resized to the model's
    return path


def test_attribute_against_the_registry(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    trained: Trained,
    redis_client: redis.Redis,
    redis_db_url: str,
    redis_namespace: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    register(Registry(redis_client, Keys(redis_namespace)), trained)
    cfg = tmp_path / "c.toml"
    store = trained.router_dir.parent  # artifacts are read only from the artifact store the config names
    cfg.write_text(f'[redis]\nnamespace = "{redis_namespace}"\n[daemon]\nartifact_dir = "{store}"\n')
    img = write_png(tmp_path / "x.png", digit_sources(3)[0].images[0])
    argv = ["--config", str(cfg), "attribute", str(img), "--redis", redis_db_url, "--draws", "2", "--seed", "1"]
    assert main([*argv, "--sources", "alpha,gamma", "--timesteps", "10,200"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["sources"] == ["alpha", "gamma"] and abs(sum(doc["posterior"]) - 1) < 1e-5
    assert [b["t"] for b in doc["by_timestep"]] == [10, 200] and doc["top_source"] in ("alpha", "gamma")
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["sources"] == ["alpha", "beta", "gamma"]
    assert main([*argv, "--sources", "nope"]) == 2
    assert "unknown source" in capsys.readouterr().err


def test_attribute_against_a_density_registry(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    trained: Trained,
    redis_client: redis.Redis,
    redis_db_url: str,
    redis_namespace: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    reg = Registry(redis_client, Keys(redis_namespace))
    register(reg, trained)
    reg.set_routing("density")
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f'[redis]\nnamespace = "{redis_namespace}"\n[daemon]\nartifact_dir = "{trained.router_dir.parent}"\n'
    )
    img = write_png(tmp_path / "x.png", digit_sources(3)[2].images[0])
    argv = ["--config", str(cfg), "attribute", str(img), "--redis", redis_db_url, "--draws", "2", "--seed", "1"]
    assert main([*argv, "--sources", "beta,gamma", "--timesteps", "10,200"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["method"] == "elbo" and doc["sources"] == ["beta", "gamma"] and abs(sum(doc["posterior"]) - 1) < 1e-5
    assert [b["t"] for b in doc["by_timestep"]] == [10, 200] and doc["top_source"] in ("beta", "gamma")
    assert main([*argv, "--label", "9"]) == 0  # digit 9 is only gamma's: its class prior is 1
    labelled = json.loads(capsys.readouterr().out)
    assert labelled["sources"] == ["alpha", "beta", "gamma"] and labelled["posterior"] == [0.0, 0.0, 1.0]
    assert main([*argv, "--sources", "nope"]) == 2
    assert "unknown source" in capsys.readouterr().err


def test_attribute_offline_from_a_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    store = LocalStore(tmp_path / "store", model=MODEL)
    lo, hi = digit_sources(2)
    for name, data in (("lo", lo), ("hi", hi)):
        store.stage_data(name, data)
        store.train_compartment(name, TRAIN, progress=False)
    store.train_router(ROUTER, progress=False)
    grey = hi.images[0].reshape(*hi.images[0].shape[:2], 1)
    img = write_png(tmp_path / "x.png", np.repeat(grey, 3, axis=-1))  # RGB: converted to grey
    assert main(["attribute", str(img), "--store", str(tmp_path / "store"), "--draws", "2"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["sources"] == ["hi", "lo"] and len(doc["by_timestep"]) == 4 and doc["draws"] == 2
    assert doc["method"] == "router"
    assert main(["attribute", str(tmp_path / "missing.png"), "--store", str(tmp_path / "store")]) == 2
    assert "does not exist" in capsys.readouterr().err
