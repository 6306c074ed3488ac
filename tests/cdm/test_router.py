"""The router learns P(source | x_t, t[, c]): far above chance at low noise, the priors at high noise."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from cdm.data import to_model_tensor
from cdm.errors import IntegrityError, StoreError, TrainingInterrupted
from cdm.routing import WEIGHTS, load_router, save_router, train_router
from tests.cdm.conftest import TINY_MODEL, TINY_ROUTER


@pytest.fixture(scope="module")
def trained(two_class_disjoint_sources):
    cfg = dataclasses.replace(TINY_ROUTER, steps=250, batch_size=128)
    return train_router(two_class_disjoint_sources, model=TINY_MODEL, router=cfg, num_classes=10, progress=False)


def _noised(data, t: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    abar = DDPMScheduler(**TINY_MODEL.scheduler_config()).alphas_cumprod
    x0 = to_model_tensor(data.images, TINY_MODEL.sample_size)
    g = torch.Generator().manual_seed(seed)
    a = abar[t]
    return a.sqrt() * x0 + (1 - a).sqrt() * torch.randn(x0.shape, generator=g), torch.full((len(x0),), t)


def test_router_far_above_chance_at_low_noise(trained, two_class_disjoint_sources) -> None:
    correct = total = 0
    for i, name in enumerate(trained.router.source_names):
        x, t = _noised(two_class_disjoint_sources[name], 20)
        with torch.no_grad():
            pred = trained.router(x, t, None).argmax(1)
        correct += int((pred == i).sum())
        total += len(pred)
    assert correct / total > 0.85, f"low-noise accuracy {correct / total:.2f}"
    assert trained.report.accuracy_by_noise[0] > 0.8
    assert trained.report.accuracy_by_noise[0] > trained.report.accuracy_by_noise[-1]


def test_router_returns_priors_at_high_noise(trained, two_class_disjoint_sources) -> None:
    n = {k: len(v) for k, v in two_class_disjoint_sources.items()}
    priors = torch.tensor([n[s] / sum(n.values()) for s in trained.router.source_names])
    xs = torch.cat([_noised(two_class_disjoint_sources[s], 999)[0] for s in trained.router.source_names])
    with torch.no_grad():
        w = trained.router(xs, torch.full((len(xs),), 999), None).softmax(1)
    assert torch.allclose(w.mean(0), priors, atol=0.08), f"{w.mean(0)} vs priors {priors}"
    # with the class given, the sources are class-disjoint: P(i | c) is one-hot even at pure noise
    labels = torch.cat([torch.as_tensor(two_class_disjoint_sources[s].labels) for s in trained.router.source_names])
    with torch.no_grad():
        wc = trained.router(xs, torch.full((len(xs),), 999), labels).softmax(1)
    expected = (labels >= 3).long() if trained.router.source_names[1] == "high" else (labels <= 2).long()
    assert (wc.argmax(1) == expected).float().mean() > 0.95


def test_router_report_and_save_load(tmp_path: Path, trained, two_class_disjoint_sources) -> None:
    r = trained.report
    assert len(r.accuracy_by_noise) == 10 and 0 <= r.ece <= 1
    assert abs(sum(r.priors) - 1) < 1e-6
    m = save_router(trained.router, trained.manifest, tmp_path / "router")
    router, manifest = load_router(tmp_path / "router")
    x, t = _noised(two_class_disjoint_sources["low"], 100)
    with torch.no_grad():
        torch.testing.assert_close(router(x[:8], t[:8], None), trained.router(x[:8], t[:8], None), rtol=0, atol=0)
    assert manifest.sha256 == m.sha256 and manifest.source_names == ["low", "high"]
    w = tmp_path / "router" / WEIGHTS
    raw = bytearray(w.read_bytes())
    raw[-2] ^= 1
    w.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError):
        load_router(tmp_path / "router")


def test_a_stopped_router_run_resumes_from_its_checkpoint_to_the_same_weights(
    two_class_disjoint_sources, tmp_path: Path
) -> None:
    cfg = dataclasses.replace(TINY_ROUTER, steps=12, batch_size=16, checkpoint_every=4)

    def run(workdir: Path | None, should_stop=None):
        return train_router(
            two_class_disjoint_sources,
            model=TINY_MODEL,
            router=cfg,
            num_classes=10,
            progress=False,
            should_stop=should_stop,
            workdir=workdir,
        )

    whole = run(None)
    # stopped before step 7: the checkpoint holds step 6, and nothing is returned
    polls: list[int] = []
    with pytest.raises(TrainingInterrupted, match="step 6 of 12"):
        run(tmp_path, should_stop=lambda: polls.append(1) or len(polls) > 6)
    state = json.loads((tmp_path / "train_state" / "state.json").read_text())
    assert state["step"] == 6
    steps_seen: list[int] = []
    resumed = train_router(
        two_class_disjoint_sources,
        model=TINY_MODEL,
        router=cfg,
        num_classes=10,
        progress=False,
        workdir=tmp_path,
        should_stop=lambda: steps_seen.append(1) and False,
    )
    assert len(steps_seen) == 12 - 6, "the rerun trained only the steps left after the checkpoint"
    assert resumed.report.steps == whole.report.steps == 12
    want, got = whole.router.state_dict(), resumed.router.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), f"{k} differs after resume"
    assert resumed.report.accuracy == whole.report.accuracy
    # a checkpoint of other data is refused, not silently resumed
    other = {k: v.subset(np.arange(len(v)) > 0) for k, v in two_class_disjoint_sources.items()}
    with pytest.raises(StoreError, match="another run"):
        train_router(other, model=TINY_MODEL, router=cfg, num_classes=10, progress=False, workdir=tmp_path)
