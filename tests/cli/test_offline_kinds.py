"""The offline CLI under the router-free routing kinds ("density", "heads"): the store records its kind at its first
training and every command follows it; another kind later is refused with the way on."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cdm.compartment import HEAD_CONFIG, HEAD_WEIGHTS
from cdm.data import load_npz
from cdm.errors import StoreError
from cdm.store import LocalStore
from cli import main
from tests.cli.test_offline import TINY_TOML


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    code = main(list(argv))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out.strip().splitlines()[-1])


def config(tmp_path: Path, kind: str) -> list[str]:
    path = tmp_path / f"config-{kind}.toml"
    path.write_text(TINY_TOML.replace("[router]\n", f'[router]\nkind = "{kind}"\n'))
    return ["--config", str(path)]


def files_sha256(store: LocalStore, name: str) -> dict[str, str]:
    entry = next(e for e in store.catalogue.active() if e.source == name)
    return {rel: f.sha256 for rel, f in entry.files.items()}


@pytest.fixture
def sources(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Path]:
    out = tmp_path / "src"
    run(capsys, "split", "--data", "digits", "--scheme", "by-class", "--n", "2", "--out", str(out))
    return {"lo": out / "source-0.npz", "hi": out / "source-1.npz"}


@pytest.mark.parametrize("kind", ["density", "heads"])
def test_train_sample_attribute_forget_under_a_router_free_kind(
    kind: str, tmp_path: Path, sources: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    c = config(tmp_path, kind)
    store_dir = tmp_path / "store"
    store = str(store_dir)
    srcs = [a for n, p in sources.items() for a in ("--source", f"{n}={p}")]
    trained = run(capsys, *c, "train", "--store", store, *srcs, "--no-progress")
    assert trained["routing"] == kind and sorted(trained["trained"]) == ["hi", "lo"]
    s = LocalStore(store_dir)
    assert s.routing_kind() == kind and s.catalogue.router() is None, "no learnt router is trained"
    with_head = {n: HEAD_WEIGHTS in files_sha256(s, n) and HEAD_CONFIG in files_sha256(s, n) for n in ("hi", "lo")}
    assert with_head == {"hi": kind == "heads", "lo": kind == "heads"}
    listing = run(capsys, *c, "ls", "--store", store, "--json")
    assert listing["routing"] == kind and listing["router"] is None
    # sample: both sources, attribution over both
    out, png = tmp_path / "s.npz", tmp_path / "grid.png"
    res = run(capsys, *c, "sample", "--store", store, "--n", "4", "--out", str(out), "--png", str(png),
              "--labels", "0,7", "--no-progress")  # fmt: skip
    z = np.load(out)
    assert res["n"] == 4 and z["images"].shape == (4, 8, 8, 1) and list(z["sources"]) == ["hi", "lo"]
    assert z["attribution"].shape == (4, 2) and np.allclose(z["attribution"].sum(1), 1, atol=1e-4)
    with Image.open(png) as im:
        assert im.size[0] > 8 * 4
    # attribute: the heads kind by its heads (the router path), the density kind by each compartment's ELBO
    image = tmp_path / "img.png"
    Image.fromarray(z["images"][0, :, :, 0]).save(image)
    att = run(capsys, *c, "attribute", str(image), "--store", store, "--timesteps", "100,500", "--draws", "2")
    assert att["sources"] == ["hi", "lo"] and abs(sum(att["posterior"]) - 1) < 1e-3
    assert att["method"] == ("router" if kind == "heads" else "elbo")
    # forget some samples of hi: only hi is retrained (with a new head under "heads"), lo untouched
    lo_before = files_sha256(s, "lo")
    ids = load_npz(sources["hi"]).ids[:5].tolist()
    receipt = run(capsys, *c, "forget", "--store", store, "--source", "hi", "--samples", ",".join(map(str, ids)),
                  "--no-progress")  # fmt: skip
    assert receipt["kind"] == "forget-samples" and receipt["n_samples_removed"] == 5
    s = LocalStore(store_dir)
    assert files_sha256(s, "lo") == lo_before and s.manifest("hi").n_samples == load_npz(sources["hi"]).ids.size - 5
    assert (HEAD_WEIGHTS in files_sha256(s, "hi")) == (kind == "heads") and s.catalogue.router() is None
    # forget the source lo: its compartment (and head) deleted, nothing trained, hi untouched
    hi_before, lo_dir = files_sha256(s, "hi"), s.compartment_dir("lo")
    assert lo_dir.is_dir()
    receipt = run(capsys, *c, "forget", "--store", store, "--source", "lo", "--no-progress")
    assert receipt["kind"] == "forget-source" and receipt["retired"] == ["lo@v1"]
    assert receipt["router_after"] is None and receipt["steps_retrained"] is None
    deleted = " ".join(receipt["deleted_files"]).replace("%40", "@")
    assert "lo@v1/manifest.json" in deleted and ("lo@v1/head.safetensors" in deleted) == (kind == "heads")
    assert not lo_dir.exists()
    s = LocalStore(store_dir)
    assert s.sources() == ["hi"] and files_sha256(s, "hi") == hi_before
    sub = run(capsys, *c, "sample", "--store", store, "--n", "2", "--out", str(out), "--no-progress")
    assert list(sub["dominant_source_counts"]) == ["hi"]


def test_a_store_keeps_its_kind_and_refuses_another(
    tmp_path: Path, sources: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    store_dir = tmp_path / "store"
    store = str(store_dir)
    heads, learnt = config(tmp_path, "heads"), config(tmp_path, "learnt")
    run(capsys, *heads, "train", "--store", store, "--source", f"lo={sources['lo']}", "--no-progress")
    files = sorted(p.relative_to(store_dir).as_posix() for p in store_dir.rglob("*") if p.is_file())
    # training or forgetting under another kind: refused, naming the store's kind and the ways on; nothing changes
    for argv in (
        [*learnt, "train", "--store", store, "--source", f"hi={sources['hi']}", "--no-progress"],
        [*config(tmp_path, "density"), "train", "--store", store, "--no-progress"],
        [*learnt, "forget", "--store", store, "--source", "lo", "--no-progress"],
        [*learnt, "forget", "--store", store, "--source", "lo", "--samples", "1,2", "--no-progress"],
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "trained under [router] kind = 'heads'" in err and "Set [router] kind = 'heads'" in err, err
        assert "new --store directory" in err
    assert sorted(p.relative_to(store_dir).as_posix() for p in store_dir.rglob("*") if p.is_file()) == files
    # reading needs no kind: sampling follows the store's, whatever the config says
    out = tmp_path / "s.npz"
    res = run(capsys, *learnt, "sample", "--store", store, "--n", "2", "--out", str(out), "--no-progress")
    assert list(res["dominant_source_counts"]) == ["lo"]
    # the store's own kind goes on working
    again = run(capsys, *heads, "train", "--store", store, "--source", f"hi={sources['hi']}", "--no-progress")
    assert again["trained"] == ["hi"] and again["routing"] == "heads"


def test_a_store_older_than_the_record_is_learnt(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A store trained before the kind was recorded is a learnt store (that is all it could be)."""
    s = LocalStore(tmp_path / "store")
    assert s.catalogue.routing() is None and s.routing_kind() == "learnt"
    assert s.use_routing("heads", record=False) == "heads" and s.catalogue.routing() is None, "nothing trained yet"
    s.catalogue.begin_training("old", "f" * 64, {})  # as an older cdm left it: a compartment, no kind recorded
    assert s.catalogue.routing() is None and s.routing_kind() == "learnt"
    with pytest.raises(StoreError, match="trained under \\[router\\] kind = 'learnt', not 'density'"):
        s.use_routing("density")
    assert s.use_routing("learnt") == "learnt"
