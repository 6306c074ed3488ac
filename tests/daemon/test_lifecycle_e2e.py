"""Forgetting across replicas and lag, and replica identity, with real daemons, broker and Redis (issue 8,
items 9 and 10)."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from kafka import KafkaConsumer, TopicPartition

from cdm.data import fingerprint
from cli import main
from daemon.wire import Seal, encode_chunk, encode_seal
from registry.records import CompartmentStatus
from tests.daemon.daemon_harness import DaemonEnv, daemon_env, digit_sources, names_by_partition

pytestmark = [pytest.mark.services, pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture
def env(tmp_path: Path, redis_db_url: str, kafka_bootstrap: str) -> Iterator[DaemonEnv]:
    with daemon_env(tmp_path / "d", redis_db_url, kafka_bootstrap, "lc", steps=10, checkpoint_every=5) as e:
        yield e


def group_committed(env: DaemonEnv, partition: int) -> int | None:
    c = KafkaConsumer(bootstrap_servers=env.bootstrap, group_id=f"{env.prefix}.group", enable_auto_commit=False)
    try:
        return c.committed(TopicPartition(f"{env.prefix}.sources", partition))
    finally:
        c.close(autocommit=False)


def test_a_forget_is_honoured_by_every_replica_and_by_records_still_in_kafka(env: DaemonEnv) -> None:
    env.start_daemon("a")
    env.start_daemon("b")
    env.wait("both daemons alive", lambda: len(env.coordinator().live_daemons()) == 2, 90)
    names = names_by_partition(4)  # one source per partition: both replicas stage some, on their own spools
    data = dict(zip(names, digit_sources(4).values(), strict=True))
    env.push(data)
    env.wait_serving(set(names), timeout=300)
    victim, vdata = names[0], data[names[0]]
    reg = env.registry()
    assert (
        main(["--config", str(env.config_path), "control", "forget-source", "--source", victim, "--request-id", "f1"])
        == 0
    )
    receipt = env.wait("the forget's receipt", lambda: reg.receipt("f1"), 180)
    env.wait_serving(set(names) - {victim}, timeout=180)
    tomb = reg.tombstone(victim)
    assert tomb is not None and tomb.request_id == "f1" and tomb.through
    assert all(r.fingerprint == "" and r.lineage == {} for r in reg.history(victim)), "scrubbed"
    assert receipt["retired"] == [f"{victim}@v1"] and receipt["deleted_files"]
    # records of the victim produced before the forget but consumed after it (consumer lag): a second copy of
    # the whole push, as a producer retrying after a timeout would leave it, with its original CreateTime
    producer = env.producer()
    before = int(tomb.forgotten_at * 1000) - 1000
    parts = [vdata.subset(np.arange(i, min(i + 200, len(vdata)))) for i in range(0, len(vdata), 200)]
    messages = [encode_chunk(victim, i, p) for i, p in enumerate(parts)]
    messages.append(encode_seal(Seal(victim, len(parts), fingerprint(vdata), len(vdata))))
    sent = [
        producer.send(f"{env.prefix}.sources", key=m.key, value=m.value, headers=m.headers, timestamp_ms=before).get(10)
        for m in messages
    ]
    producer.close()
    partition, last = sent[0].partition, max(md.offset for md in sent)
    # whichever replica owns the partition ignores them and commits past them
    env.wait("the stale records committed", lambda: (group_committed(env, partition) or 0) > last, 120)
    time.sleep(2)  # a resurrection would show up as a training record by now (the debounce is 0.5 s)
    assert [(r.version, r.status) for r in reg.history(victim)] == [(1, CompartmentStatus.RETIRED)]
    assert victim not in {c.source for c in reg.snapshot().compartments}
    assert not list(env.root.glob(f"spool-*/sources/{victim}")), "no replica staged the forgotten source again"
    # a push of the same id after the forget is a new source
    env.push({victim: vdata.subset(np.arange(150))})
    snap = env.wait_serving(set(names), timeout=300)
    assert snap.by_source()[victim].compartment_id == f"{victim}@v2" and snap.by_source()[victim].n_samples == 150


def test_a_daemon_restarted_after_kill_9_takes_its_training_lock_back_at_once(env: DaemonEnv) -> None:
    env.steps, env.checkpoint_every, env.lock_ttl_s = 300, 10, 120.0
    env.write_config()
    first = env.start_daemon("first")
    env.push({"d0": digit_sources(2)["d0"]})
    work = env.root / "artifacts" / "work"
    env.wait("a training checkpoint", lambda: any(work.glob("d0-*/train_state/state.json")), 180)
    coordinator = env.coordinator()
    assert coordinator.source_lock_owner("d0") == "replica-0"
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    restarted_at = time.monotonic()
    second = env.start_daemon("second")  # the same replica (slot 0): the same id, replica-0

    def training_again() -> bool:
        info = coordinator.heartbeat_info("replica-0") or {}
        return info.get("pid") == second.pid and info.get("job") == "train" and int(info.get("step") or 0) > 0

    env.wait("training resumed", training_again, 110)
    waited = time.monotonic() - restarted_at
    print(f"kill -9 -> restart -> training resumed after {waited:.1f}s (lock lease {env.lock_ttl_s:.0f}s)")
    assert waited < env.lock_ttl_s / 2, f"waited {waited:.0f}s: the predecessor's lock lease was waited out"
    assert "took back 1 lock(s) of a previous run" in (env.root / "daemon-second.log").read_text()
    env.wait_serving({"d0"}, timeout=300)
    assert [r.version for r in env.registry().history("d0")] == [1]


def test_two_live_daemons_with_one_identity_are_refused(env: DaemonEnv) -> None:
    a = env.start_daemon("a", daemon_id="same")
    env.wait("a alive", lambda: [d.daemon_id for d in env.coordinator().live_daemons()] == ["same"], 90)
    b = env.start_daemon("b", daemon_id="same")
    try:
        code = b.wait(120)
    except subprocess.TimeoutExpired:
        pytest.fail(f"a second live daemon with id 'same' was not refused\n{env.logs()}")
    assert code == 2
    log = (env.root / "daemon-b.log").read_text()
    assert "refusing to start" in log and "'same' is held by a live daemon" in log and f"pid {a.pid}" in log
    assert a.poll() is None
    info = env.coordinator().heartbeat_info("same") or {}
    assert info.get("pid") == a.pid, json.dumps(info)
