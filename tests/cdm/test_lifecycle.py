"""cdm/lifecycle.py through the offline store: the same plans the daemon runs, over a JSON catalogue.

A crash after any step is finished by running the request again (``cdm forget`` again finds the unfinished
request), with one receipt; a request whose journal is complete is only acknowledged again.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import cdm.store
from cdm.artifacts import sha256_file
from cdm.compartment import WEIGHTS
from cdm.config import ModelConfig, RouterConfig, TrainConfig
from cdm.data import SourceData, fingerprint, load_digits, save_npz
from cdm.errors import CdmError, StoreError, TrainingInterrupted
from cdm.lifecycle import FORGET_STEPS, ForgetReceipt, Lifecycle, data_key, work_dir, work_dirs
from cdm.store import LocalStore
from cdm.training import slice_of, train_compartment

MODEL = ModelConfig(sample_size=8, block_out_channels=(8, 16), norm_num_groups=4, num_classes=10)
TRAIN = TrainConfig(steps=4, batch_size=16, warmup_steps=1, checkpoint_every=2, lr=1e-3, threads=1)
ROUTER = RouterConfig(steps=8, batch_size=32, channels=(8, 16), eval_samples=32, threads=1)


@pytest.fixture(autouse=True)
def restore_torch_threads() -> Iterator[None]:
    """The configs here train on one thread (``threads = 1`` sets torch's global count): put it back after."""
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


class SimulatedCrash(BaseException):
    """The process dies between two steps."""


@pytest.fixture(scope="module")
def sources() -> dict[str, SourceData]:
    d = load_digits()
    assert d.labels is not None
    return {
        "low": d.subset(np.flatnonzero(d.labels <= 2)[:120]),
        "high": d.subset(np.flatnonzero(d.labels >= 3)[:120]),
    }


@pytest.fixture
def store(tmp_path: Path, sources: dict[str, SourceData]) -> LocalStore:
    s = LocalStore(tmp_path / "store", model=MODEL)
    for name, data in sources.items():
        s.stage_data(name, data)
        s.train_compartment(name, TRAIN, progress=False)
    s.train_router(ROUTER, progress=False)
    return s


def receipt_files(store: LocalStore) -> list[Path]:
    return sorted((store.root / "receipts").glob("*.json"))


def files_of(store: LocalStore) -> list[str]:
    """Every file of the store but its bookkeeping (catalogue, journal, receipts)."""
    skip = ("catalogue.json", "store.json", "journal/", "receipts/")
    rels = (p.relative_to(store.root).as_posix() for p in store.root.rglob("*") if p.is_file())
    return sorted(r for r in rels if not r.startswith(skip))


def test_the_offline_store_runs_the_shared_lifecycle_and_its_one_receipt_type(store: LocalStore) -> None:
    assert cdm.store.ForgetReceipt is ForgetReceipt
    assert isinstance(store.lifecycle(), Lifecycle)
    receipt = store.forget_source("low", ROUTER, progress=False)
    assert isinstance(receipt, ForgetReceipt) and receipt.kind == "forget-source"
    (path,) = receipt_files(store)
    assert ForgetReceipt.from_dict(json.loads(path.read_text())) == receipt
    assert all(u.startswith("file:///") for u in receipt.deleted_files)
    assert not [f for f in files_of(store) if "low" in f]


@pytest.mark.parametrize("kind", ["forget-source", "forget-samples"])
@pytest.mark.parametrize("crash_after", FORGET_STEPS[:-1])
def test_a_crash_after_any_step_is_finished_by_running_the_request_again(
    store: LocalStore, sources: dict[str, SourceData], kind: str, crash_after: str
) -> None:
    high_weights = sha256_file(store.compartment_dir("high") / WEIGHTS)
    ids = [int(i) for i in sources["low"].ids[:4]]

    def forget(after_step: object = None) -> ForgetReceipt:
        if kind == "forget-source":
            return store.forget_source("low", ROUTER, progress=False, after_step=after_step)  # type: ignore[arg-type]
        return store.forget_samples("low", ids, TRAIN, ROUTER, progress=False, after_step=after_step)  # type: ignore[arg-type]

    def crash(step: str) -> None:
        if step == crash_after:
            raise SimulatedCrash(step)

    with pytest.raises(SimulatedCrash):
        forget(crash)
    assert receipt_files(store) == []
    receipt = forget()  # `cdm forget` run again: the unfinished request is found and finished
    assert len(receipt_files(store)) == 1 and receipt.untouched == {"high@v1": high_weights}
    assert sha256_file(store.compartment_dir("high") / WEIGHTS) == high_weights
    router = store.catalogue.router()
    assert router is not None and sum(f.startswith("routers/") for f in files_of(store)) == 3  # only the active one
    if kind == "forget-source":
        assert store.sources() == ["high"] and router.compartment_ids == ("high@v1",)
        assert not [f for f in files_of(store) if "low" in f], "nothing of the forgotten source may be left"
    else:
        assert store.sources() == ["high", "low"] and sorted(router.compartment_ids) == ["high@v1", "low@v2"]
        assert not np.isin(store.load_data("low").ids, ids).any()
        assert [f for f in files_of(store) if "low" in f and "low@v2" not in f] == [
            f"data/low/{store.manifest('low').fingerprint}.npz"
        ]


def test_a_completed_request_is_acknowledged_again_without_redoing_anything(store: LocalStore) -> None:
    first = store.forget_samples("low", [0, 1], TRAIN, ROUTER, progress=False, request_id="req-1")
    files = files_of(store)
    again = store.forget_samples("low", [0, 1], TRAIN, ROUTER, progress=False, request_id="req-1")
    assert again == first and files_of(store) == files and len(receipt_files(store)) == 1
    with pytest.raises(CdmError, match=r"req-1.*new request id"):
        store.forget_source("high", ROUTER, progress=False, request_id="req-1")


def test_forget_samples_that_match_nothing_change_nothing(store: LocalStore) -> None:
    files, manifest = files_of(store), store.manifest("low")
    receipt = store.forget_samples("low", [10**9], TRAIN, ROUTER, progress=False)
    assert (receipt.outcome, receipt.n_samples_removed, receipt.deleted_files) == ("no-match", 0, ())
    assert receipt.unmatched_ids == (10**9,) and "nothing changed" in receipt.detail
    assert files_of(store) == files and store.manifest("low") == manifest
    unknown = store.forget_samples("nope", [1], TRAIN, ROUTER, progress=False)
    assert unknown.outcome == "unknown-source" and files_of(store) == files


def test_forget_samples_matching_every_sample_forgets_the_source(store: LocalStore, sources: dict) -> None:
    receipt = store.forget_samples("low", sources["low"].ids.tolist(), TRAIN, ROUTER, progress=False)
    assert receipt.outcome == "forgotten" and receipt.retired == ("low@v1",)
    assert store.sources() == ["high"] and not [f for f in files_of(store) if "low" in f]


def test_with_the_density_router_a_forget_trains_nothing(tmp_path: Path, sources: dict[str, SourceData]) -> None:
    s = LocalStore(tmp_path / "density", model=MODEL)
    for name, data in sources.items():
        s.stage_data(name, data)
        s.train_compartment(name, TRAIN, progress=False)
    assert s.train_router(ROUTER, progress=False, router_kind="density") is None
    epoch = s.catalogue.epoch
    lc = s.lifecycle(router=ROUTER, router_kind="density", progress=False)
    receipt = lc.forget_source("low", request_id="density-1")
    assert receipt.router_after is None and s.catalogue.router() is None
    assert s.catalogue.epoch == epoch + 1  # retire: one composition change
    assert [f for f in files_of(s) if "low" in f] == [] and s.sources() == ["high"]
    # the per-source data copy is still kept (forget-samples retrains from it)
    high = s.catalogue.active()[0]
    assert s.artifacts.exists(data_key("high", high.fingerprint))


def test_the_cli_forget_finishes_an_interrupted_request(
    store: LocalStore, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cli import main

    with pytest.raises(SimulatedCrash):
        store.forget_source("low", ROUTER, progress=False, after_step=lambda s: _raise(s == "router"))
    config = tmp_path / "config.toml"
    config.write_text("[router]\nsteps = 8\nbatch_size = 32\nchannels = [8, 16]\neval_samples = 32\nthreads = 1\n")
    assert (
        main(["--config", str(config), "forget", "--store", str(store.root), "--source", "low", "--no-progress"]) == 0
    )
    receipt = json.loads(capsys.readouterr().out)
    assert receipt["kind"] == "forget-source" and receipt["source"] == "low" and receipt["deleted_files"]
    assert len(receipt_files(store)) == 1 and LocalStore(store.root).sources() == ["high"]


def _raise(crash: bool) -> None:
    if crash:
        raise SimulatedCrash("router")


def test_work_dirs_match_the_source_exactly(tmp_path: Path, sources: dict[str, SourceData]) -> None:
    fp = fingerprint(sources["low"])
    for name in ("shoes", "shoes-v2", "shoes_old"):
        (work_dir(tmp_path, name, fp) / "train_state").mkdir(parents=True)
    (tmp_path / "work" / "shoes-notahexsuffix00").mkdir()
    assert [p.name for p in work_dirs(tmp_path, "shoes")] == [f"shoes-{fp[:16]}"]
    assert [p.name for p in work_dirs(tmp_path, "shoes-v2")] == [f"shoes-v2-{fp[:16]}"]


def test_a_format_1_store_is_refused_with_what_to_do(tmp_path: Path, sources: dict[str, SourceData]) -> None:
    root = tmp_path / "old"
    root.mkdir()
    (root / "store.json").write_text(json.dumps({"format": 1, "model": {}}))
    save_npz(root / "low.npz", sources["low"])
    with pytest.raises(StoreError, match=r"format-1 store.*new --store"):
        LocalStore(root)


# --------------------------------------------------------------------------------------------- SISA slices

SLICED = dataclasses.replace(TRAIN, steps=8, slices=4)  # slice j ends at step 2j


@pytest.fixture
def sliced(tmp_path: Path, sources: dict[str, SourceData]) -> LocalStore:
    s = LocalStore(tmp_path / "sliced", model=MODEL)
    for name, data in sources.items():
        s.stage_data(name, data)
        s.train_compartment(name, SLICED, progress=False)
    s.train_router(ROUTER, progress=False)
    return s


def in_slice(data: SourceData, j: int, n: int = 1) -> list[int]:
    """``n`` sample ids of 1-based slice ``j`` under SLICED."""
    return [int(i) for i in data.ids[slice_of(data.ids, SLICED.slices) == j - 1][:n]]


def stored_checkpoints(store: LocalStore, cid: str) -> dict[str, str]:
    """sha256 of every slice checkpoint file kept with a compartment, by its path below the compartment."""
    root = store.root / "compartments" / cid
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted((root / "slices").rglob("*")) if p.is_file()}


def test_a_sliced_compartment_keeps_its_checkpoints_beside_it_hashed_in_its_manifest(sliced: LocalStore) -> None:
    manifest = sliced.manifest("low")
    listed = {rel: sha for rec in manifest.slices for rel, sha in rec.checkpoint.items()}
    assert len(manifest.slices) == 4 and len(listed) == 6  # after slices 1..3: tensors + JSON each
    assert stored_checkpoints(sliced, "low@v1") == listed
    entry = next(e for e in sliced.catalogue.active() if e.source == "low")
    assert not [rel for rel in entry.files if rel.startswith("slices/")], "samplers must not fetch checkpoints"
    sliced.load_compartment("low")  # the compartment still verifies and loads with its checkpoints beside it


def test_forget_samples_retrains_only_from_the_checkpoint_before_the_first_slice_holding_one(
    sliced: LocalStore, sources: dict[str, SourceData], tmp_path: Path
) -> None:
    low, high_weights = sources["low"], sha256_file(sliced.compartment_dir("high") / WEIGHTS)
    old = stored_checkpoints(sliced, "low@v1")
    ids = in_slice(low, 3, 2) + in_slice(low, 4)  # first forgotten slice: 3
    receipt = sliced.forget_samples("low", ids, SLICED, ROUTER, progress=False)
    assert receipt.new_compartment == "low@v2" and receipt.n_samples_removed == 3
    assert (receipt.slices, receipt.resumed_from_slice, receipt.resumed_from_step, receipt.steps_retrained) == (
        4,
        2,
        4,
        4,
    )
    assert "from the checkpoint after slice 2 of 4 (4 of 8 steps)" in receipt.detail
    assert receipt.untouched == {"high@v1": high_weights}
    manifest = sliced.manifest("low")
    assert (manifest.base_compartment, manifest.base_slice, manifest.base_step) == ("low@v1", 2, 4)
    # checkpoints before slice 3 are byte-identical; 3 is rebuilt; nothing of low@v1 is left
    new = stored_checkpoints(sliced, "low@v2")
    assert new == {rel: sha for rec in manifest.slices for rel, sha in rec.checkpoint.items()}
    for rel in old:
        assert (new[rel] == old[rel]) == rel.startswith(("slices/1/", "slices/2/")), rel
    assert not [f for f in files_of(sliced) if "low@v1" in f]
    assert any("low%40v1/slices/3/" in u or "low@v1/slices/3/" in u for u in receipt.deleted_files)
    # the retrained compartment is the one training from scratch on the data left gives (same seed and slices)
    kept = low.subset(~np.isin(low.ids, ids))
    scratch = train_compartment(
        "low", kept, model=MODEL, train=SLICED, num_classes=10, workdir=tmp_path / "w", progress=False
    )
    assert scratch.compartment is not None
    got, want = sliced.load_compartment("low").unet.state_dict(), scratch.compartment.unet.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert {rel: sha256_file(tmp_path / "w" / rel) for rel in new} == new


def test_forgetting_a_sample_of_the_first_slice_retrains_the_whole_compartment(
    sliced: LocalStore, sources: dict[str, SourceData]
) -> None:
    old = stored_checkpoints(sliced, "low@v1")
    receipt = sliced.forget_samples("low", in_slice(sources["low"], 1) + in_slice(sources["low"], 2), SLICED, ROUTER)
    assert (receipt.resumed_from_slice, receipt.resumed_from_step, receipt.steps_retrained) == (0, 0, 8)
    new = stored_checkpoints(sliced, "low@v2")
    assert new.keys() == old.keys() and not [r for r in new if r.endswith(".safetensors") and new[r] == old[r]]


def test_with_one_slice_forget_samples_retrains_from_scratch_as_before(store: LocalStore) -> None:
    receipt = store.forget_samples("low", [0, 1], TRAIN, ROUTER, progress=False)
    assert (receipt.slices, receipt.resumed_from_slice, receipt.steps_retrained) == (1, 0, TRAIN.steps)
    assert store.manifest("low").slices == () and stored_checkpoints(store, "low@v2") == {}


@pytest.mark.parametrize("crash_after", ["plan", "train", "delete"])
def test_a_crash_during_a_sliced_forget_is_finished_by_the_rerun_with_one_receipt(
    sliced: LocalStore, sources: dict[str, SourceData], crash_after: str
) -> None:
    ids = in_slice(sources["low"], 2)

    def crash(step: str) -> None:
        if step == crash_after:
            raise SimulatedCrash(step)

    with pytest.raises(SimulatedCrash):
        sliced.forget_samples("low", ids, SLICED, ROUTER, progress=False, after_step=crash)
    receipt = sliced.forget_samples("low", ids, SLICED, ROUTER, progress=False)
    assert (receipt.resumed_from_slice, receipt.resumed_from_step, receipt.steps_retrained) == (1, 2, 6)
    assert len(receipt_files(sliced)) == 1 and sliced.manifest("low").base_compartment == "low@v1"
    assert not [f for f in files_of(sliced) if "low@v1" in f or f.startswith(("work/", "out/"))]


def test_an_interrupted_sliced_retrain_is_finished_by_the_rerun_from_where_it_stopped(
    sliced: LocalStore, sources: dict[str, SourceData]
) -> None:
    ids = in_slice(sources["low"], 3)
    seen: list[int] = []
    lc = sliced.lifecycle(train=SLICED, router=ROUTER, progress=False, should_stop=lambda: len(seen) >= 1)
    lc.on_step = lambda source, step, steps, loss: seen.append(step)
    with pytest.raises(TrainingInterrupted):
        lc.forget_samples("low", ids, request_id="sliced-1")
    assert seen == [5], "the retrain started after slice 2 (step 4)"
    seen.clear()
    lc = sliced.lifecycle(train=SLICED, router=ROUTER, progress=False)
    lc.on_step = lambda source, step, steps, loss: seen.append(step)
    receipt = lc.forget_samples("low", ids, request_id="sliced-1")
    assert seen == [6, 7, 8] and (receipt.resumed_from_slice, receipt.steps_retrained) == (2, 4)
    assert not [f for f in files_of(sliced) if "low@v1" in f or f.startswith("work/")]


def test_a_tampered_or_foreign_checkpoint_is_never_resumed_from(
    sliced: LocalStore, sources: dict[str, SourceData]
) -> None:
    (sliced.root / "compartments" / "low@v1" / "slices" / "2" / "state.safetensors").write_bytes(b"tampered")
    receipt = sliced.forget_samples("low", in_slice(sources["low"], 3), SLICED, ROUTER, progress=False)
    assert (receipt.resumed_from_slice, receipt.steps_retrained) == (1, 6), "only slice 1's checkpoint verifies"
    other = dataclasses.replace(SLICED, lr=2e-3)  # another [train] config: its checkpoints do not apply
    receipt = sliced.forget_samples("low", in_slice(sources["low"], 4), other, ROUTER, progress=False)
    assert (receipt.resumed_from_slice, receipt.steps_retrained) == (0, 8)


def test_with_heads_each_compartment_carries_its_head_and_a_forget_touches_only_its_source(
    tmp_path: Path, sources: dict[str, SourceData]
) -> None:
    from cdm.compartment import HEAD_CONFIG, HEAD_WEIGHTS, Compartment
    from cdm.lifecycle import compartment_prefix
    from cdm.routing import build_composition

    s = LocalStore(tmp_path / "heads", model=MODEL)
    lc = s.lifecycle(train=TRAIN, router=ROUTER, router_kind="heads", progress=False)
    for name, data in sources.items():
        s.stage_data(name, data)
        outcome = lc.train(name, data, lineage={"source": name})
        assert outcome.trained and outcome.result is not None
    # 1. add: compartment + head, in one artifact (hashed, uploaded, registered); no router, no router training
    assert s.catalogue.router() is None and not (s.root / "routers").exists()
    entries = {e.source: e for e in s.catalogue.active()}
    for name, entry in entries.items():
        assert {HEAD_CONFIG, HEAD_WEIGHTS} <= set(entry.files), f"{name}'s head is not registered with it"
        comp = s.load_compartment(name)
        assert comp.head is not None and comp.head.doc["fingerprint"] == entry.fingerprint
        assert comp.head.doc["steps"] == ROUTER.steps and comp.manifest.steps == TRAIN.steps
    comps = [s.load_compartment(n) for n in sorted(entries)]
    den = build_composition("heads", comps, sorted(entries), n_samples=[entries[n].n_samples for n in sorted(entries)])
    x = torch.randn(4, 1, 8, 8)
    assert den.compose(x, torch.full((4,), 500), None).weights.shape == (4, 2)
    directory = s.compartment_dir("high")
    before = {e.source: dict(e.files) for e in s.catalogue.active()}

    def digests(source: str) -> dict[str, str]:
        return {rel: f.sha256 for rel, f in before[source].items()}

    # 2. forget-samples of "low": compartment + head of "low" retrained, "high" byte-identical, still no router
    low = s.load_data("low")
    receipt = lc.forget_samples("low", [int(low.ids[0])], request_id="heads-samples")
    assert receipt.router_after is None and s.catalogue.router() is None
    after = {e.source: e for e in s.catalogue.active()}
    assert {rel: f.sha256 for rel, f in after["high"].files.items()} == digests("high")
    assert after["low"].compartment_id != entries["low"].compartment_id
    new_low = {rel: f.sha256 for rel, f in after["low"].files.items()}
    assert new_low[HEAD_WEIGHTS] != digests("low")[HEAD_WEIGHTS] and new_low[WEIGHTS] != digests("low")[WEIGHTS]
    head = s.load_compartment("low").head
    assert head is not None and head.doc["n_samples"] == len(low) - 1
    assert not s.artifacts.exists(f"{compartment_prefix(entries['low'].compartment_id)}/{HEAD_WEIGHTS}")
    # 3. forget-source of "low": its compartment and head deleted, nothing trained, "high" untouched
    receipt = lc.forget_source("low", request_id="heads-source")
    assert receipt.router_after is None and s.sources() == ["high"]
    assert [f for f in files_of(s) if "low" in f] == []
    assert {rel: f.sha256 for rel, f in s.catalogue.active()[0].files.items()} == digests("high")
    # 4. a tampered head is refused like any file of the compartment
    assert Compartment.load(directory).head is not None
    (directory / HEAD_WEIGHTS).write_bytes(b"tampered")
    with pytest.raises(CdmError, match="sha256"):
        Compartment.load(directory)
