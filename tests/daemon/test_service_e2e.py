"""The daemon end to end against the real broker and Redis: train, serve, hot swap, forget, crash, scale out."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
from kafka import KafkaConsumer, TopicPartition

from cdm.artifacts import ArtifactsConfig, artifact_path
from cli import main
from registry.keys import Keys
from registry.reader import RegistryClient
from registry.records import CompartmentStatus
from sampler.live import LiveComposition
from sampler.loader import CompositionLoader
from tests.daemon.daemon_harness import DaemonEnv, daemon_env, digit_sources, http_get, metric, names_by_partition

pytestmark = [pytest.mark.services, pytest.mark.slow, pytest.mark.timeout(420)]


@pytest.fixture
def env(tmp_path: Path, redis_db_url: str, kafka_bootstrap: str) -> Iterator[DaemonEnv]:
    with daemon_env(tmp_path / "d", redis_db_url, kafka_bootstrap, "e2e") as e:
        yield e


def test_sources_to_compartments_hot_swap_sample_and_forget(env: DaemonEnv, capsys) -> None:
    sources = digit_sources(4)
    daemon = env.start_daemon()
    # 1. three sources -> three compartments and a router covering them
    env.push({k: sources[k] for k in ["d0", "d1", "d2"]})
    snap = env.wait_serving({"d0", "d1", "d2"})
    assert all(c.status is CompartmentStatus.ACTIVE and c.version == 1 for c in snap.compartments)
    assert all(c.artifact_uri.startswith("file://") and c.sha256 for c in snap.compartments)
    # 2. `cdm sample --redis` serves all three
    out = env.root / "live.npz"
    assert (
        main(
            [
                "--config",
                str(env.config_path),
                "sample",
                "--redis",
                env.redis_url,
                "--n",
                "6",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    z = np.load(out)
    assert sorted(z["sources"].tolist()) == ["d0", "d1", "d2"] and z["attribution"].shape == (6, 3)
    # 3. a sampling loop runs while a 4th source arrives: hot-swapped in, no failed request, no restart
    client = redis.Redis.from_url(env.redis_url)
    loader = CompositionLoader.from_config(
        ArtifactsConfig(), default_dir=env.root / "artifacts", base_dir=env.root / "sampler"
    )
    live = LiveComposition(RegistryClient(client, Keys(env.namespace)), loader, resync_s=0.5)
    live.start()
    failures: list[str] = []
    served: set[tuple[str, ...]] = set()
    stop = threading.Event()

    def sampling_loop() -> None:
        while not stop.is_set():
            try:
                _, result = live.sample(2, num_inference_steps=2)
                served.add(tuple(sorted(result.source_names)))
            except Exception as exc:
                if live.current() is not None:
                    failures.append(repr(exc))
                time.sleep(0.05)

    t = threading.Thread(target=sampling_loop)
    t.start()
    try:
        env.wait("the live sampler to serve 3 sources", lambda: live.current() is not None, 60)
        env.push({"d3": sources["d3"]})
        env.wait_serving({"d0", "d1", "d2", "d3"})
        env.wait("the sampler to swap to 4 sources", lambda: ("d0", "d1", "d2", "d3") in served, 60)
    finally:
        stop.set()
        t.join(30)
        live.stop()
    assert failures == []
    assert ("d0", "d1", "d2") in served and live.swaps >= 2
    assert daemon.poll() is None, "the daemon must not restart to serve a new source"
    # 4. forget d1 through the control topic
    port = env.http_port()
    before = env.registry().snapshot()
    d1_dir = artifact_path(before.by_source()["d1"].artifact_uri)
    assert d1_dir.exists()
    assert (
        main(["--config", str(env.config_path), "control", "forget-source", "--source", "d1", "--request-id", "req-1"])
        == 0
    )
    snap = env.wait_serving({"d0", "d2", "d3"})
    assert snap.epoch > before.epoch
    receipt = env.wait("the forget's receipt (written once it is complete)", lambda: env.registry().receipt("req-1"))
    assert not d1_dir.exists() and not (env.root / "artifacts" / "data" / "d1").exists()
    assert not list((env.root / "artifacts" / "work").glob("d1-*"))
    audit = env.registry().audit(50)
    done = [a for a in audit if a.get("kind") == "forget-complete"]
    assert len(done) == 1 and done[0]["source"] == "d1" and done[0]["deleted_files"] == receipt["deleted_files"]
    assert d1_dir.as_uri() + "/manifest.json" in receipt["deleted_files"]
    assert set(done[0]["untouched"]) == set(snap.compartment_ids)
    capsys.readouterr()
    assert main(["--config", str(env.config_path), "ls", "--redis", env.redis_url, "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing["epoch"] == snap.epoch
    assert sorted(c["source"] for c in listing["compartments"]) == ["d0", "d2", "d3"]
    assert listing["router"]["compartment_ids"] == list(snap.compartment_ids)
    assert len(listing["daemons"]) == 1 and listing["audit"]
    # 5. metrics and health
    status, body = http_get(port, "/metrics")
    assert status == 200
    assert metric(body, "cdm_compartments_active") == 3
    assert metric(body, "cdm_registry_epoch") == snap.epoch
    assert metric(body, "cdm_training_seconds_count") == 4
    assert (metric(body, "cdm_messages_ingested_total") or 0) > 0
    assert (metric(body, "cdm_forgetting_seconds_count") or 0) == 1
    assert 0 <= (metric(body, "cdm_router_accuracy") or -1) <= 1
    assert http_get(port, "/healthz")[0] == 200
    assert http_get(port, "/readyz")[0] == 200
    # 6. the status page: every source with its state, the epoch, the receipt of d1 (tests/api/test_ui*.py has more)
    status, page = http_get(port, "/ui?refresh=0")
    assert status == 200 and f'id="served-epoch">{snap.epoch}<' in page
    assert all(f'data-source="{s}"' in page for s in ("d0", "d1", "d2", "d3"))
    assert 'class="state forgotten">forgotten<' in page
    assert "d1@v1" in page.split('id="receipts"')[1].split("</section>")[0]


def test_bad_messages_go_to_the_dlq_and_the_daemon_stays_healthy(env: DaemonEnv) -> None:
    env.start_daemon()
    producer = env.producer()
    topic = f"{env.prefix}.sources"
    bad = [
        (b"x", b"not an npz", [("cdm-version", b"1"), ("cdm-kind", b"chunk"), ("cdm-seq", b"0")]),
        (b"x", b"{}", [("cdm-version", b"9"), ("cdm-kind", b"seal")]),
        (b"bad key!", b"{}", [("cdm-version", b"1"), ("cdm-kind", b"seal")]),
    ]
    for key, value, headers in bad:
        producer.send(topic, key=key, value=value, headers=headers).get(10)
    producer.send(f"{env.prefix}.control", key=b"x", value=b"{not json").get(10)
    producer.close()
    consumer = KafkaConsumer(
        f"{env.prefix}.dlq", bootstrap_servers=env.bootstrap, auto_offset_reset="earliest", consumer_timeout_ms=1000
    )
    reasons: list[str] = []
    env.wait(
        "4 dead letters",
        lambda: reasons.extend(dict(r.headers)["cdm-dlq-reason"].decode() for r in consumer) or len(reasons) >= 4,
        60,
    )
    consumer.close()
    # each record has one defect, so one reason (daemon/wire.py checks version, kind, key, then the kind's fields):
    # the chunk lacks cdm-sha256, the seal says version 9, the key has a space and "!", the control is not JSON
    assert sorted(reasons) == ["bad-header", "bad-json", "bad-key", "bad-version"]
    port = env.http_port()
    assert http_get(port, "/healthz")[0] == 200
    _, body = http_get(port, "/metrics")
    assert sum(metric(body, "cdm_dlq_messages_total", f'reason="{r}"') or 0 for r in set(reasons)) == len(reasons)


def test_sigkill_mid_training_resumes_and_trains_exactly_once(env: DaemonEnv) -> None:
    env.steps, env.checkpoint_every = 200, 10
    env.write_config()
    daemon = env.start_daemon("first")
    env.push({"d0": digit_sources(2)["d0"]})
    work = env.root / "artifacts" / "work"
    env.wait("a training checkpoint", lambda: any(work.glob("d0-*/train_state/state.json")), 120)
    time.sleep(0.5)
    os.kill(daemon.pid, signal.SIGKILL)
    daemon.wait(10)
    env.start_daemon("second")
    snap = env.wait_serving({"d0"}, timeout=240)
    history = env.registry().history("d0")
    assert [r.version for r in history] == [1], f"trained more than once: {history}"
    metrics = snap.by_source()["d0"].train_metrics
    assert metrics["resumed_from"] > 0 and metrics["steps"] == 200
    # offsets: everything of d0 consumed and committed once it is registered
    consumer = KafkaConsumer(bootstrap_servers=env.bootstrap, group_id=f"{env.prefix}.group-probe")
    parts = consumer.partitions_for_topic(f"{env.prefix}.sources") or set()
    consumer.close()

    assert history[0].lineage, "the compartment records where its data was read"
    tps = [TopicPartition(f"{env.prefix}.sources", p) for p in sorted(parts)]
    assert tps, "the sources topic has partitions"
    committed: dict[TopicPartition, int | None] = {}
    ends: dict[TopicPartition, int] = {}

    def committed_all() -> bool:
        """Every partition's committed offset is its end offset: every record consumed, and committed."""
        c = KafkaConsumer(bootstrap_servers=env.bootstrap, group_id=f"{env.prefix}.group", enable_auto_commit=False)
        try:
            committed.update({tp: c.committed(tp) for tp in tps})
            ends.update(c.end_offsets(tps))
        finally:
            c.close(autocommit=False)
        # a partition no record went to has end offset 0 and may have no commit at all
        return all((committed[tp] or 0) == ends[tp] for tp in tps)

    env.wait("offsets committed", committed_all, 60)
    assert sum(ends.values()) > 0, "d0's records are on the topic, so some partition has a commit to check"


def test_two_daemons_in_one_group_split_sources_and_train_each_once(env: DaemonEnv) -> None:
    env.start_daemon("a")
    env.start_daemon("b")
    # one source per partition of the 4-partition topic, so each member of the group owns some
    names = names_by_partition(4)
    sources = {names[i]: data for i, data in enumerate(digit_sources(4).values())}
    env.wait("both daemons alive", lambda: len(env.coordinator().live_daemons()) == 2, 60)
    env.push(sources)
    snap = env.wait_serving(set(sources), timeout=240)
    reg = env.registry()
    for s in sources:
        assert [r.version for r in reg.history(s)] == [1]
    trainers = {c.train_metrics.get("daemon_id") for c in snap.compartments}
    assert len(trainers) == 2, f"one daemon trained everything: {trainers}"


def test_sigterm_is_a_warm_shutdown_that_commits_nothing_unregistered(env: DaemonEnv) -> None:
    env.steps, env.checkpoint_every = 200, 10
    env.write_config()
    daemon = env.start_daemon("first")
    env.push({"d0": digit_sources(2)["d0"]})
    work = env.root / "artifacts" / "work"
    env.wait("a training checkpoint", lambda: any(work.glob("d0-*/train_state/state.json")), 120)
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(60) == 0, env.logs()
    assert "warm shutdown" in env.logs()
    reg = env.registry()
    assert [r.status for r in reg.history("d0")] == [CompartmentStatus.TRAINING]
    assert reg.snapshot().compartments == ()
    # nothing of d0 was committed: a fresh member of the group would be handed it again
    c = KafkaConsumer(bootstrap_servers=env.bootstrap, group_id=f"{env.prefix}.group", enable_auto_commit=False)
    try:
        tps = [
            TopicPartition(f"{env.prefix}.sources", p) for p in c.partitions_for_topic(f"{env.prefix}.sources") or ()
        ]
        assert all(c.committed(tp) in (None, 0) for tp in tps)
    finally:
        c.close(autocommit=False)
    env.start_daemon("second")
    snap = env.wait_serving({"d0"}, timeout=240)
    assert [r.version for r in reg.history("d0")] == [1]
    assert snap.by_source()["d0"].train_metrics["resumed_from"] > 0
