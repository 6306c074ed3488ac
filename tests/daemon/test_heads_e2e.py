"""The daemon under ``[router] kind = "heads"`` with the real broker and Redis: each compartment carries its own head,
no router is ever trained, and forgetting a source deletes its compartment and head and touches nothing else."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from cdm.artifacts import artifact_path
from cdm.compartment import HEAD_CONFIG, HEAD_WEIGHTS
from cli import main
from registry.records import CompartmentStatus
from tests.daemon.daemon_harness import DaemonEnv, daemon_env, digit_sources

pytestmark = [pytest.mark.services, pytest.mark.slow, pytest.mark.timeout(420)]


@pytest.fixture
def env(tmp_path: Path, redis_db_url: str, kafka_bootstrap: str) -> Iterator[DaemonEnv]:
    with daemon_env(
        tmp_path / "d", redis_db_url, kafka_bootstrap, "heads", steps=10, checkpoint_every=5, router_kind="heads"
    ) as e:
        yield e


def test_heads_kind_serves_each_compartment_with_its_head_and_forgets_one_without_training(env: DaemonEnv) -> None:
    sources = digit_sources(2)
    env.start_daemon()
    env.push(sources)
    snap = env.wait_serving({"d0", "d1"}, timeout=300)
    assert snap.routing == "heads" and snap.router is None, "the heads kind trains no router"
    assert all(HEAD_WEIGHTS in c.sha256 and HEAD_CONFIG in c.sha256 for c in snap.compartments)
    # `cdm sample --redis` composes both by their heads
    out = env.root / "heads.npz"
    argv = ["--config", str(env.config_path), "sample", "--redis", env.redis_url, "--n", "4", "--top-k", "1"]
    assert main([*argv, "--out", str(out), "--no-progress"]) == 0
    z = np.load(out)
    assert sorted(z["sources"].tolist()) == ["d0", "d1"] and z["attribution"].shape == (4, 2)
    # forget d0: retire and delete (its head with it); nothing trained, d1 byte for byte as it was
    d0, d1 = snap.by_source()["d0"], snap.by_source()["d1"]
    d0_dir = artifact_path(d0.artifact_uri)
    assert (d0_dir / HEAD_WEIGHTS).is_file() and (d0_dir / HEAD_CONFIG).is_file()
    forget = ["--config", str(env.config_path), "control", "forget-source", "--source", "d0", "--request-id", "h1"]
    assert main(forget) == 0
    receipt = env.wait("the forget's receipt", lambda: env.registry().receipt("h1"), 180)
    after = env.wait_serving({"d1"}, timeout=180)
    assert receipt["retired"] == ["d0@v1"] and receipt["router_after"] is None
    assert receipt["steps_retrained"] is None and receipt["new_compartment"] is None
    deleted = {Path(artifact_path(u)).name for u in receipt["deleted_files"] if f"{d0_dir.as_uri()}/" in u}
    assert {HEAD_WEIGHTS, HEAD_CONFIG, "manifest.json"} <= deleted
    assert not d0_dir.exists()
    kept = after.by_source()["d1"]
    assert (kept.compartment_id, kept.sha256) == (d1.compartment_id, d1.sha256), "d1's compartment and head unchanged"
    assert after.router is None and [r.version for r in env.registry().history("d1")] == [1]
    assert [(r.version, r.status) for r in env.registry().history("d0")] == [(1, CompartmentStatus.RETIRED)]
