"""The offline CLI end to end on sklearn digits with a tiny model: split, train, sample, ls, forget."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli import build_parser, main

TINY_TOML = """
[model]
sample_size = 8
block_out_channels = [16, 32]
[train]
steps = 4
batch_size = 32
warmup_steps = 1
[router]
steps = 20
batch_size = 64
channels = [16, 32]
eval_samples = 64
[sample]
num_inference_steps = 3
"""


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_help_teaches_with_examples() -> None:
    text = build_parser().format_help()
    assert "eps = sum_i w_i" in text and "cdm train --store" in text and "cdm push" in text


def test_offline_pipeline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text(TINY_TOML)
    c = ["--config", str(cfg)]
    split = run(
        capsys, *c, "split", "--data", "digits", "--scheme", "by-class", "--n", "2", "--out", str(tmp_path / "src")
    )
    assert [len(s["classes"]) for s in split] == [5, 5]
    store = str(tmp_path / "store")
    a, b = (f"{n}={tmp_path / 'src' / f'source-{i}.npz'}" for i, n in enumerate(["lo", "hi"]))
    trained = run(capsys, *c, "train", "--store", store, "--source", a, "--source", b, "--no-progress")
    assert trained["sources"] == ["hi", "lo"] and sorted(trained["trained"]) == ["hi", "lo"]
    # the same data again is recognised by its fingerprint and not retrained
    again = run(capsys, *c, "train", "--store", store, "--source", a, "--no-progress")
    assert again["trained"] == []
    out = tmp_path / "s.npz"
    png = tmp_path / "grid.png"
    res = run(
        capsys,
        *c,
        "sample",
        "--store",
        store,
        "--n",
        "6",
        "--out",
        str(out),
        "--png",
        str(png),
        "--labels",
        "0,7",
        "--no-progress",
    )
    assert res["n"] == 6
    z = np.load(out)
    assert z["images"].shape == (6, 8, 8, 1) and z["images"].dtype == np.uint8
    assert z["attribution"].shape == (6, 2) and list(z["sources"]) == ["hi", "lo"]
    with Image.open(png) as im:
        assert im.size[0] > 8 * 4
    listing = run(capsys, *c, "ls", "--store", store, "--json")
    assert [r["name"] for r in listing["compartments"]] == ["hi", "lo"]
    receipt = run(capsys, *c, "forget", "--store", store, "--source", "lo", "--no-progress")
    assert receipt["kind"] == "forget-source" and receipt["source"] == "lo" and receipt["deleted_files"]
    sub = run(capsys, *c, "sample", "--store", store, "--n", "2", "--out", str(out), "--no-progress")
    assert list(sub["dominant_source_counts"]) == ["hi"]


def test_errors_are_clear(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.npz"
    np.savez(bad, images=np.zeros((3, 8, 8), dtype=np.float32))
    assert main(["train", "--store", str(tmp_path / "s"), "--source", f"x={bad}"]) == 2
    assert "uint8" in capsys.readouterr().err
    cfg = tmp_path / "c.toml"
    cfg.write_text("[train]\nstepz = 3\n")
    assert main(["--config", str(cfg), "train", "--store", str(tmp_path / "s")]) == 2
    assert "stepz" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--store", "x", "--source", "no-equals-sign"])
