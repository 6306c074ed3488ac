"""Outages of the real services under a real daemon (issue 8): Redis, then the Kafka-protocol broker, is stopped
for 30 s while one source is being trained and another pushed, then started again on the same port with its
data. The daemon keeps running (not ready while the service is away), catches up, and trains every source exactly
once on all of its records; no offset is committed before its source is registered; nothing is dead-lettered.

Each test runs the service it stops on its own (``deploy.local.services.redis_server`` with an fsynced append-only
file; ``tansu_server`` keeping its topics in a bucket of the test S3 server), the other one is the session's.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError

from cdm.data import SourceData, fingerprint
from deploy.local.services import Server, redis_server, tansu_s3_env, tansu_server
from registry.records import CompartmentStatus
from tests.conftest import S3_TEST_ACCESS_KEY, S3_TEST_REGION, S3_TEST_SECRET_KEY
from tests.daemon.daemon_harness import REPO, DaemonEnv, digit_sources, http_get, metric

pytestmark = [pytest.mark.services, pytest.mark.slow, pytest.mark.timeout(900)]

OUTAGE_S = 30.0  # how long the service stays down
STEPS = 150  # long enough that the outage finds the second source training


@dataclass
class CommitWatch:
    """Checks, as often as it is asked, that the daemon's group never committed past a record of a source that
    is not registered yet: the committed offset is read first, the topic and the registry after it, so a commit
    seen here was made before the registration seen after it."""

    env: DaemonEnv
    enabled: bool = True  # off while the broker is away (clients that cannot bootstrap leak sockets)
    samples: int = 0  # checks that saw the broker, the topic and the registry
    violations: list[str] = field(default_factory=list)
    records: dict[int, dict[int, str]] = field(default_factory=dict)  # partition -> offset -> source
    _group: KafkaConsumer | None = None
    _reader: KafkaConsumer | None = None

    def check(self) -> None:
        if not self.enabled:
            return
        try:
            self._check()
        except (KafkaError, redis.RedisError, OSError, AssertionError):
            self.close()  # a service is away: reconnect at the next check

    def _check(self) -> None:
        topic = f"{self.env.prefix}.sources"
        if self._group is None:
            self._group = KafkaConsumer(
                bootstrap_servers=self.env.bootstrap, group_id=f"{self.env.prefix}.group", enable_auto_commit=False
            )
        if self._reader is None:
            reader = KafkaConsumer(bootstrap_servers=self.env.bootstrap, enable_auto_commit=False)
            partitions = reader.partitions_for_topic(topic)
            assert partitions, "the sources topic is not there yet"
            reader.assign([TopicPartition(topic, p) for p in partitions])
            reader.seek_to_beginning()
            self._reader = reader
        partitions = sorted(tp.partition for tp in self._reader.assignment())
        committed = {p: self._group.committed(TopicPartition(topic, p)) for p in partitions}
        for batch in self._reader.poll(timeout_ms=200).values():
            for r in batch:
                self.records.setdefault(r.partition, {})[r.offset] = (r.key or b"").decode()
        registered = {c.source for c in self.env.registry().snapshot().compartments}
        for p, offset in committed.items():
            read_up_to = self._reader.position(TopicPartition(topic, p))
            if offset is None or read_up_to is None or read_up_to < offset:
                continue  # nothing committed, or records not read yet (never a false alarm)
            for o, source in self.records.get(p, {}).items():
                if o < offset and source not in registered:
                    self.violations.append(f"partition {p} committed at {offset} past {source}@{o}, not registered")
        self.samples += 1

    def close(self) -> None:
        for consumer in (self._group, self._reader):
            if consumer is not None:
                consumer.close(autocommit=False)
        self._group = self._reader = None


def readyz(port: int) -> tuple[int, str]:
    try:
        return http_get(port, "/readyz")
    except OSError as exc:  # the health server is the daemon's own: it answers during outages
        return 0, repr(exc)


def read_topic(bootstrap: str, topic: str, seconds: float = 5.0) -> list[tuple[int, int, bytes | None]]:
    """(partition, offset, key) of every record of ``topic``, read without a group."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(partitions)
        consumer.seek_to_beginning()
        found: list[tuple[int, int, bytes | None]] = []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=200).values():
                found += [(r.partition, r.offset, r.key) for r in batch]
        return sorted(found)
    finally:
        consumer.close()


def run_outage(
    env: DaemonEnv,
    server: Server,
    *,
    push_during: Callable[[str, SourceData], Callable[[], None]],
    reason: str,
    before_stop: Callable[[], None] = lambda: None,
    watch_broker_during_outage: bool = True,
) -> None:
    """The scenario: d0 serving; d1 pushed and training when ``server`` stops (``before_stop`` runs just before);
    d2 pushed during the outage (``push_during`` starts that and returns what waits for it to finish); ``server``
    back after OUTAGE_S; /readyz says ``reason`` meanwhile."""
    sources = digit_sources(3)
    watch = CommitWatch(env)
    try:
        daemon = env.start_daemon()
        env.push({"d0": sources["d0"]})
        env.wait_serving({"d0"}, timeout=300)
        port = env.http_port()
        env.wait("/readyz to answer 200", lambda: readyz(port)[0] == 200, 60)
        env.push({"d1": sources["d1"]})
        coordinator = env.coordinator()

        def d1_training() -> bool:
            watch.check()
            info = coordinator.heartbeat_info("replica-0") or {}
            return info.get("job") == "train" and info.get("source") == "d1" and int(info.get("step") or 0) > 0

        env.wait("d1 training", d1_training, 180)
        # 1. the outage: the service stops while d1 trains and d2 is pushed
        before_stop()
        down_at = time.monotonic()
        watch.enabled = watch_broker_during_outage
        if not watch.enabled:
            watch.close()
        assert server.stop()
        push_done = push_during("d2", sources["d2"])
        not_ready: list[str] = []

        def reports_not_ready() -> bool:
            watch.check()
            code, body = readyz(port)
            if code == 503:
                not_ready.append(body)
            return code == 503

        env.wait("/readyz to report the outage", reports_not_ready, OUTAGE_S - 5)
        assert reason in not_ready[-1], not_ready[-1]
        while time.monotonic() < down_at + OUTAGE_S:
            assert daemon.poll() is None, f"the daemon exited during the outage\n{env.logs()}"
            watch.check()
            time.sleep(0.5)
        assert readyz(port)[0] == 503, "still not ready at the end of the outage"
        # 2. the service is back on its port with its data
        server.start()
        watch.enabled = True
        push_done()

        def all_serving() -> bool:
            watch.check()
            snap = env.registry().snapshot()
            routed = set(snap.router.compartment_ids) if snap.router else set()
            return {c.source for c in snap.compartments} == set(sources) and routed == set(snap.compartment_ids)

        env.wait("every source registered and routed", all_serving, 600)
        env.wait("/readyz to answer 200 again", lambda: readyz(port)[0] == 200, 120)
        topic = f"{env.prefix}.sources"
        ends: dict[int, int] = {}
        for partition, offset, _ in read_topic(env.bootstrap, topic):
            ends[partition] = max(ends.get(partition, 0), offset + 1)

        def all_committed() -> bool:
            watch.check()
            return all(group_committed(env, p) == end for p, end in ends.items())

        env.wait("every record committed", all_committed, 120)
    finally:
        watch.close()
    # 3. one process all along; each source trained once, on all of its records; nothing dead-lettered
    assert daemon.poll() is None, f"the daemon restarted\n{env.logs()}"
    assert watch.violations == [] and watch.samples >= 10, (watch.samples, watch.violations[:5])
    reg = env.registry()
    for name, data in sources.items():
        history = [(r.version, r.status) for r in reg.history(name)]
        assert history == [(1, CompartmentStatus.ACTIVE)], (name, history)
        record = reg.snapshot().by_source()[name]
        assert (record.n_samples, record.fingerprint) == (len(data), fingerprint(data)), name
    _, text = http_get(port, "/metrics")
    assert metric(text, "cdm_compartments_trained_total") == 3
    assert read_topic(env.bootstrap, f"{env.prefix}.dlq", seconds=3) == []
    log = env.logs()
    assert "giving up" not in log and "training-failed" not in log


def group_committed(env: DaemonEnv, partition: int) -> int | None:
    c = KafkaConsumer(bootstrap_servers=env.bootstrap, group_id=f"{env.prefix}.group", enable_auto_commit=False)
    try:
        return c.committed(TopicPartition(f"{env.prefix}.sources", partition))
    finally:
        c.close(autocommit=False)


def make_env(root: Path, redis_url: str, bootstrap: str) -> DaemonEnv:
    tag = uuid.uuid4().hex[:8]
    env = DaemonEnv(
        root=root, redis_url=redis_url, bootstrap=bootstrap, prefix=f"out-{tag}", namespace=f"out-{tag}", steps=STEPS
    )
    env.write_config()
    return env


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[Server]:
    with redis_server(tmp_path / "redis", persist=True).start() as server:
        yield server


@pytest.fixture
def private_broker(tmp_path: Path, s3_endpoint: str, s3_bucket: str) -> Iterator[Server]:
    env = tansu_s3_env(s3_endpoint, access_key=S3_TEST_ACCESS_KEY, secret_key=S3_TEST_SECRET_KEY, region=S3_TEST_REGION)
    with tansu_server(tmp_path / "kafka", storage=f"s3://{s3_bucket}/", env=env).start() as server:
        yield server


def test_a_redis_outage_while_training_and_pushing_loses_nothing_and_trains_once(
    tmp_path: Path, private_redis: Server, kafka_bootstrap: str
) -> None:
    env = make_env(tmp_path / "d", f"redis://127.0.0.1:{private_redis.port}/0", kafka_bootstrap)
    try:

        def push_during(name: str, data: SourceData) -> Callable[[], None]:
            env.push({name: data})  # the broker is up: d2 is consumed while the registry is away
            return lambda: None

        run_outage(env, private_redis, push_during=push_during, reason="redis unreachable at redis://127.0.0.1:")
        assert private_redis.starts == 2
    finally:
        env.stop_all()


# A producer process that connected before the outage and pushes during it (run apart: kafka-python 3.0.12 leaves
# the sockets of refused connections to the garbage collector, which pytest would report as unraisable warnings).
LATE_PUSH = """
import sys
from kafka import KafkaProducer
from daemon.producer import push_source
from tests.daemon.daemon_harness import digit_sources

bootstrap, topic, name = sys.argv[1:4]
producer = KafkaProducer(bootstrap_servers=bootstrap)
producer.partitions_for(topic)  # connected, with the topic's metadata
print("connected", flush=True)
sys.stdin.readline()  # the broker is away now
push_source(producer, topic, name, digit_sources(3)[name], chunk_size=200, progress=False, timeout_s=180)
producer.close()
print("pushed", flush=True)
"""


def test_a_broker_outage_while_training_and_pushing_loses_nothing_and_trains_once(
    tmp_path: Path, private_broker: Server, redis_db_url: str
) -> None:
    env = make_env(tmp_path / "d", redis_db_url, f"127.0.0.1:{private_broker.port}")
    topic = f"{env.prefix}.sources"
    log = (tmp_path / "pusher.log").open("wb")
    pusher = subprocess.Popen(
        [sys.executable, "-c", LATE_PUSH, env.bootstrap, topic, "d2"],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    try:

        def connect() -> None:
            assert pusher.stdout is not None and pusher.stdout.readline().strip() == "connected"

        def push_during(name: str, data: SourceData) -> Callable[[], None]:
            assert pusher.stdin is not None and name == "d2"
            pusher.stdin.write("go\n")
            pusher.stdin.flush()

            def done() -> None:
                out, _ = pusher.communicate(timeout=240)
                assert pusher.returncode == 0 and "pushed" in out, (tmp_path / "pusher.log").read_text()[-3000:]

            return done

        run_outage(
            env,
            private_broker,
            push_during=push_during,
            reason="ingest is backing off: the broker did not answer",
            before_stop=connect,
            watch_broker_during_outage=False,
        )
        assert private_broker.starts == 2
    finally:
        if pusher.poll() is None:
            pusher.kill()
        pusher.communicate()  # reaps it and closes its pipes
        log.close()
        env.stop_all()
