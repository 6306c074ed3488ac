"""daemon/registry.py against the real redis-server of deploy/local/services.py (no mocks)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import redis

from daemon.errors import CompartmentNotFound, InvalidTransition
from daemon.keys import Keys, compartment_id, parse_compartment_id
from daemon.registry import (
    CompartmentRecord,
    CompartmentStatus,
    Registry,
    RegistryClient,
    RegistrySnapshot,
    RouterRecord,
)

pytestmark = pytest.mark.services

SHA = {"unet/diffusion_pytorch_model.safetensors": "ab" * 32}


class FakeClock:
    """Deterministic wall clock for timestamps (Redis TTLs still run on Redis' own clock)."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


@pytest.fixture
def keys(redis_namespace: str) -> Keys:
    return Keys(redis_namespace)


@pytest.fixture
def registry(redis_client: redis.Redis, keys: Keys) -> Registry:
    return Registry(redis_client, keys, clock=FakeClock())


def train_and_activate(registry: Registry, source: str, fingerprint: str, n: int = 10) -> CompartmentRecord:
    record = registry.begin_training(source, fingerprint, {"topic": "cdm.sources", "offsets": {"0": n}})
    return registry.activate(
        record.compartment_id,
        artifact_uri=f"/artifacts/{record.compartment_id}",
        sha256=SHA,
        prior=float(n),
        class_counts=[n, 0],
        n_samples=n,
        train_metrics={"final_loss": 0.1},
    )


# --------------------------------------------------------------------------------------------- lifecycle


def test_begin_training_creates_versioned_record(registry: Registry, redis_client: redis.Redis, keys: Keys) -> None:
    record = registry.begin_training("shoes", "fp1", {"topic": "t", "partitions": [0], "offsets": {"0": 5}})
    assert record.compartment_id == "shoes@v1" == compartment_id("shoes", 1)
    assert parse_compartment_id(record.compartment_id) == ("shoes", 1)
    assert record.status is CompartmentStatus.TRAINING
    assert record.lineage == {"topic": "t", "partitions": [0], "offsets": {"0": 5}}
    assert registry.get("shoes@v1") == record
    stored = redis_client.hgetall(keys.compartment("shoes@v1"))
    assert stored[b"status"] == b"training" and stored[b"source"] == b"shoes"
    assert json.loads(stored[b"lineage"])["topic"] == "t"
    assert registry.epoch() == 0  # training does not change the composition
    assert registry.sources() == ["shoes"]


def test_fingerprint_idempotency(registry: Registry) -> None:
    first = registry.begin_training("shoes", "fp1", {})
    again = registry.begin_training("shoes", "fp1", {})
    assert again == first  # redelivered data: same compartment, no new version
    assert registry.compartment_for_fingerprint("shoes", "fp1") == first
    assert registry.compartment_for_fingerprint("shoes", "other") is None
    active = registry.activate(
        first.compartment_id,
        artifact_uri="/a",
        sha256=SHA,
        prior=1.0,
        class_counts=[1],
        n_samples=1,
        train_metrics={},
    )
    assert registry.begin_training("shoes", "fp1", {}) == active  # already trained: returned as active
    assert registry.compartment_for_fingerprint("shoes", "fp1") == active
    assert registry.epoch() == 1


def test_activation_is_complete_and_bumps_epoch_once(registry: Registry, redis_client: redis.Redis, keys: Keys) -> None:
    record = registry.begin_training("shoes", "fp1", {"topic": "t"})
    active = registry.activate(
        record.compartment_id,
        artifact_uri="/artifacts/shoes@v1",
        sha256=SHA,
        prior=0.25,
        class_counts=[3, 4],
        n_samples=7,
        train_metrics={"final_loss": 0.5, "steps": 10},
    )
    assert active.status is CompartmentStatus.ACTIVE
    assert (active.artifact_uri, active.sha256, active.prior) == ("/artifacts/shoes@v1", SHA, 0.25)
    assert (active.class_counts, active.n_samples) == ((3, 4), 7)
    assert active.train_metrics == {"final_loss": 0.5, "steps": 10}
    assert registry.get("shoes@v1") == active  # what was returned is what is stored
    assert registry.epoch() == 1
    assert redis_client.smembers(keys.active) == {b"shoes@v1"}
    assert redis_client.hget(keys.source("shoes"), "current") == b"shoes@v1"
    assert redis_client.hget(keys.source("shoes"), "training") is None
    # activating again is a no-op
    assert (
        registry.activate(
            "shoes@v1", artifact_uri="/x", sha256={}, prior=0, class_counts=[], n_samples=0, train_metrics={}
        )
        == active
    )
    assert registry.epoch() == 1


def test_activation_retires_previous_version(registry: Registry) -> None:
    v1 = train_and_activate(registry, "shoes", "fp1")
    v2 = train_and_activate(registry, "shoes", "fp2")
    assert v2.compartment_id == "shoes@v2"
    old = registry.get(v1.compartment_id)
    assert old.status is CompartmentStatus.RETIRED
    assert old.retired_reason == "replaced by shoes@v2"
    snap = registry.snapshot()
    assert snap.compartment_ids == ("shoes@v2",)
    assert snap.epoch == 2  # one bump per activation, the retirement is part of it
    assert [r.compartment_id for r in registry.history("shoes")] == ["shoes@v1", "shoes@v2"]


def test_older_version_finishing_late_is_superseded(registry: Registry) -> None:
    """v1 and v2 trained concurrently (e.g. after a crash); v2 activates first: v1 must not win."""
    v1 = registry.begin_training("shoes", "fp1", {})
    v2 = registry.begin_training("shoes", "fp2", {})  # supersedes unfinished v1
    assert registry.get(v1.compartment_id).status is CompartmentStatus.RETIRED
    with pytest.raises(InvalidTransition, match="retired"):
        registry.activate(
            v1.compartment_id, artifact_uri="/a", sha256=SHA, prior=1, class_counts=[1], n_samples=1, train_metrics={}
        )
    registry.activate(
        v2.compartment_id, artifact_uri="/b", sha256=SHA, prior=1, class_counts=[1], n_samples=1, train_metrics={}
    )
    assert registry.snapshot().compartment_ids == ("shoes@v2",)


def test_activate_unknown_compartment(registry: Registry) -> None:
    with pytest.raises(CompartmentNotFound):
        registry.activate(
            "nope@v1", artifact_uri="/a", sha256=SHA, prior=1, class_counts=[1], n_samples=1, train_metrics={}
        )
    with pytest.raises(ValueError, match="not of the form"):
        registry.get("no-version")


def test_retire(registry: Registry) -> None:
    train_and_activate(registry, "shoes", "fp1")
    train_and_activate(registry, "bags", "fp1")
    assert registry.epoch() == 2
    retired = registry.retire("shoes@v1", "operator request")
    assert retired.status is CompartmentStatus.RETIRED
    assert retired.retired_reason == "operator request"
    assert registry.epoch() == 3
    assert registry.snapshot().compartment_ids == ("bags@v1",)
    assert registry.retire("shoes@v1", "again") == registry.get("shoes@v1")  # no-op
    assert registry.epoch() == 3
    # retiring a training compartment does not change the composition
    registry.begin_training("hats", "fp", {})
    registry.retire("hats@v1", "abandoned")
    assert registry.epoch() == 3
    assert registry.audit(limit=2)[0]["compartment_id"] == "hats@v1"


def test_forget_source(registry: Registry, redis_client: redis.Redis, keys: Keys) -> None:
    train_and_activate(registry, "shoes", "fp1")
    train_and_activate(registry, "bags", "fp1")
    registry.begin_training("shoes", "fp2", {})  # v2 still training
    receipt = registry.forget_source("shoes", reason="GDPR request 42")
    assert receipt.source == "shoes"
    assert set(receipt.compartment_ids) == {"shoes@v1", "shoes@v2"}
    assert receipt.epoch == 3 == registry.epoch()  # exactly one bump for the forget
    assert registry.snapshot().compartment_ids == ("bags@v1",)
    for record in registry.history("shoes"):
        assert record.status is CompartmentStatus.RETIRED
        assert record.retired_reason == "forgotten: GDPR request 42"
    assert registry.compartment_for_fingerprint("shoes", "fp1") is None  # same data again trains afresh
    assert registry.forget_receipt(receipt.receipt_id) == receipt
    audit = registry.audit()
    assert audit[0]["kind"] == "forget" and audit[0]["receipt"]["receipt_id"] == receipt.receipt_id
    assert redis_client.hget(keys.source("shoes"), "current") is None
    # idempotent
    again = registry.forget_source("shoes")
    assert again.compartment_ids == () and again.epoch == 3
    # the version counter is not reset: ids are never reused
    assert registry.begin_training("shoes", "fp1", {}).compartment_id == "shoes@v3"


def test_set_router_bumps_epoch_and_is_in_snapshot(registry: Registry) -> None:
    train_and_activate(registry, "shoes", "fp1")
    router = RouterRecord(
        router_id="r1",
        artifact_uri="/artifacts/router-r1",
        sha256={"router.safetensors": "cd" * 32},
        compartment_ids=("shoes@v1",),
        trained_at_epoch=1,
        metrics={"accuracy": 0.9},
        created_at=5.0,
    )
    assert registry.set_router(router) == 2
    snap = registry.snapshot()
    assert snap.epoch == 2 and snap.router == router
    router2 = RouterRecord("r2", "/r2", {}, ("shoes@v1",), 2)
    assert registry.set_router(router2) == 3
    assert registry.snapshot().router == router2  # fields of r1 do not linger


def test_clear_router(registry: Registry) -> None:
    assert registry.clear_router() is None  # nothing to clear: no epoch change
    assert registry.epoch() == 0
    registry.set_router(RouterRecord("r", "/r", {}, (), 0))
    assert registry.clear_router() == 2
    assert registry.snapshot() == RegistrySnapshot(epoch=2, compartments=(), router=None)


def test_record_audit(registry: Registry) -> None:
    registry.record_audit("forget-complete", {"kind": "forget-source", "source": "shoes", "deleted_files": ["a"]})
    (entry,) = registry.audit()
    assert entry["kind"] == "forget-complete" and entry["source"] == "shoes" and entry["deleted_files"] == ["a"]
    assert entry["at"] > 0


def test_empty_snapshot(registry: Registry) -> None:
    assert registry.snapshot() == RegistrySnapshot(epoch=0, compartments=(), router=None)


# --------------------------------------------------------------------------------------------- concurrency


def test_concurrent_activations_each_bump_epoch_exactly_once(
    redis_db_url: str, keys: Keys, redis_client: redis.Redis
) -> None:
    n_threads, per_thread = 4, 5
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        client = redis.Redis.from_url(redis_db_url)
        try:
            registry = Registry(client, keys)
            for j in range(per_thread):
                train_and_activate(registry, f"s{i}", f"fp{j}")
        except BaseException as exc:
            errors.append(exc)
        finally:
            client.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    registry = Registry(redis_client, keys)
    total = n_threads * per_thread
    assert registry.epoch() == total
    snap = registry.snapshot()
    assert snap.compartment_ids == tuple(f"s{i}@v{per_thread}" for i in range(n_threads))
    activations = [c for c in registry.changes() if c.kind == "activated"]
    assert sorted(c.epoch for c in activations) == list(range(1, total + 1))  # no epoch used twice or skipped


def test_snapshot_is_consistent_under_concurrent_writes(
    redis_db_url: str, keys: Keys, redis_client: redis.Redis
) -> None:
    """With one source, the epoch after activating version k is k: every snapshot must show exactly that."""
    stop = threading.Event()
    n_versions = 40

    def writer() -> None:
        client = redis.Redis.from_url(redis_db_url)
        try:
            registry = Registry(client, keys)
            for v in range(1, n_versions + 1):
                train_and_activate(registry, "shoes", f"fp{v}")
        finally:
            stop.set()
            client.close()

    thread = threading.Thread(target=writer)
    thread.start()
    reader = RegistryClient(redis_client, keys)
    seen = 0
    while not stop.is_set() or seen == 0:
        snap = reader.snapshot()
        if snap.epoch:
            assert len(snap.compartments) == 1
            (only,) = snap.compartments
            assert only.status is CompartmentStatus.ACTIVE
            assert only.version == snap.epoch, snap
        seen += 1
    thread.join()
    assert reader.snapshot().epoch == n_versions


# --------------------------------------------------------------------------------------------- locks


def test_source_lock_exclusive_owner_only(registry: Registry) -> None:
    assert registry.acquire_source_lock("shoes", "daemon-a", ttl_s=10)
    assert not registry.acquire_source_lock("shoes", "daemon-b", ttl_s=10)
    assert registry.source_lock_owner("shoes") == "daemon-a"
    assert not registry.release_source_lock("shoes", "daemon-b")  # not the owner
    assert not registry.refresh_source_lock("shoes", "daemon-b", ttl_s=10)
    assert registry.source_lock_owner("shoes") == "daemon-a"
    assert registry.acquire_source_lock("bags", "daemon-b", ttl_s=10)  # other sources are independent
    assert registry.release_source_lock("shoes", "daemon-a")
    assert not registry.release_source_lock("shoes", "daemon-a")  # already released
    assert registry.acquire_source_lock("shoes", "daemon-b", ttl_s=10)


def test_source_lock_expires_and_refresh_extends(registry: Registry, redis_client: redis.Redis, keys: Keys) -> None:
    assert registry.acquire_source_lock("shoes", "a", ttl_s=0.5)
    assert 0 < redis_client.pttl(keys.source_lock("shoes")) <= 500
    assert registry.refresh_source_lock("shoes", "a", ttl_s=30)
    assert redis_client.pttl(keys.source_lock("shoes")) > 29_000  # extended from now
    assert registry.release_source_lock("shoes", "a")
    assert registry.acquire_source_lock("shoes", "a", ttl_s=0.2)
    time.sleep(0.3)
    assert registry.source_lock_owner("shoes") is None  # expired
    assert not registry.refresh_source_lock("shoes", "a", ttl_s=1)  # lost: refresh must not resurrect it
    assert registry.acquire_source_lock("shoes", "b", ttl_s=1)


def test_job_lock(registry: Registry) -> None:
    assert registry.acquire_job_lock("router", "a", ttl_s=5)
    assert not registry.acquire_job_lock("router", "b", ttl_s=5)
    assert registry.refresh_job_lock("router", "a", ttl_s=5)
    assert registry.release_job_lock("router", "a")
    assert registry.acquire_job_lock("router", "b", ttl_s=5)


# --------------------------------------------------------------------------------------------- heartbeat


def test_heartbeat_ttl(registry: Registry, redis_client: redis.Redis, keys: Keys) -> None:
    registry.heartbeat("d1", ttl_s=0.5, info={"host": "h", "pid": 1})
    registry.heartbeat("d2", ttl_s=10, info={"host": "h", "pid": 2})
    live = registry.live_daemons()
    assert [d.daemon_id for d in live] == ["d1", "d2"]
    assert live[0].info == {"host": "h", "pid": 1}
    assert 0 < live[0].ttl_s <= 0.5
    assert 0 < redis_client.pttl(keys.daemon("d1")) <= 500
    time.sleep(0.6)
    assert [d.daemon_id for d in registry.live_daemons()] == ["d2"]
    assert redis_client.zrange(keys.daemons, 0, -1) == [b"d2"]  # the expired one left the index
    registry.heartbeat("d1", ttl_s=10, info={"pid": 1})  # back again
    assert [d.daemon_id for d in registry.live_daemons()] == ["d1", "d2"]
    registry.clear_heartbeat("d2")
    assert [d.daemon_id for d in registry.live_daemons()] == ["d1"]


# --------------------------------------------------------------------------------------------- change log


def test_change_stream_entries(registry: Registry) -> None:
    train_and_activate(registry, "shoes", "fp1")
    train_and_activate(registry, "shoes", "fp2")
    registry.forget_source("shoes")
    changes = registry.changes()
    assert [(c.kind, c.compartment_id, c.epoch) for c in changes] == [
        ("training", "shoes@v1", 0),
        ("activated", "shoes@v1", 1),
        ("training", "shoes@v2", 1),
        ("activated", "shoes@v2", 2),
        ("forgotten", None, 3),
    ]
    assert changes[3].detail == {"replaced": "shoes@v1"}
    assert changes[4].source == "shoes"
    later = registry.changes(since_id=changes[2].stream_id)
    assert [c.kind for c in later] == ["activated", "forgotten"]
    assert registry.changes(since_id=changes[-1].stream_id) == []
    assert len(registry.changes(count=2)) == 2


def test_events_are_published(registry: Registry, redis_client: redis.Redis, keys: Keys) -> None:
    pubsub = redis_client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(keys.events)
    try:
        while pubsub.get_message(timeout=0.1) is not None:
            pass
        train_and_activate(registry, "shoes", "fp1")
        messages = []
        deadline = time.monotonic() + 5
        while len(messages) < 2 and time.monotonic() < deadline:
            m = pubsub.get_message(timeout=0.2)
            if m is not None:
                messages.append(json.loads(m["data"]))
        assert [(m["kind"], m["epoch"]) for m in messages] == [("training", 0), ("activated", 1)]
    finally:
        pubsub.close()


# --------------------------------------------------------------------------------------------- watch


class Watcher:
    """Runs RegistryClient.watch in a thread and records the epochs it delivers."""

    def __init__(self, client: RegistryClient, **kwargs: float) -> None:
        self.snapshots: list[RegistrySnapshot] = []
        self.stop = threading.Event()
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=client.watch, args=(self._on, self.stop), kwargs=kwargs)

    def _on(self, snap: RegistrySnapshot) -> None:
        with self._cond:
            self.snapshots.append(snap)
            self._cond.notify_all()

    @property
    def epochs(self) -> list[int]:
        with self._cond:
            return [s.epoch for s in self.snapshots]

    def wait_for(self, epoch: int, timeout: float = 5.0) -> float:
        """Seconds until ``epoch`` was delivered (fails after ``timeout``)."""
        t0 = time.monotonic()
        with self._cond:
            ok = self._cond.wait_for(lambda: any(s.epoch == epoch for s in self.snapshots), timeout)
        assert ok, f"epoch {epoch} not delivered; got {self.epochs}"
        return time.monotonic() - t0

    def __enter__(self) -> Watcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self._thread.join(timeout=10)
        assert not self._thread.is_alive()


@pytest.fixture
def watch_client(redis_db_url: str) -> Iterator[Callable[[], redis.Redis]]:
    clients: list[redis.Redis] = []

    def make() -> redis.Redis:
        clients.append(redis.Redis.from_url(redis_db_url))
        return clients[-1]

    yield make
    for c in clients:
        c.close()


def test_watch_sees_every_epoch(registry: Registry, keys: Keys, watch_client: Callable[[], redis.Redis]) -> None:
    train_and_activate(registry, "shoes", "fp1")  # before the watch starts: the first read catches it
    with Watcher(RegistryClient(watch_client(), keys), resync_s=30, poll_s=0.05) as watcher:
        watcher.wait_for(1)
        for epoch, fp in enumerate(["fp2", "fp3", "fp4"], start=2):
            train_and_activate(registry, "shoes", fp)
            assert watcher.wait_for(epoch) < 2  # via pub/sub, long before the 30 s resync
        registry.set_router(RouterRecord("r", "/r", {}, ("shoes@v4",), 4))
        watcher.wait_for(5)
    assert watcher.epochs == [1, 2, 3, 4, 5]
    assert watcher.snapshots[-1].router is not None
    assert watcher.snapshots[3].compartment_ids == ("shoes@v4",)


def test_watch_catches_change_whose_event_was_lost(
    registry: Registry, keys: Keys, redis_client: redis.Redis, watch_client: Callable[[], redis.Redis]
) -> None:
    """A change without (or with a missed) pub/sub message is still seen by the periodic re-read."""
    with Watcher(RegistryClient(watch_client(), keys), resync_s=0.3, poll_s=0.05) as watcher:
        watcher.wait_for(0)
        # what a writer whose PUBLISH got lost looks like: the epoch moves, no message arrives
        train_and_activate(Registry(redis_client, Keys(keys.namespace + "-elsewhere")), "x", "fp")
        redis_client.hset(keys.router, mapping={"router_id": "r", "artifact_uri": "/r"})
        redis_client.incr(keys.epoch)
        watcher.wait_for(1, timeout=3)
    assert watcher.epochs == [0, 1]
    assert watcher.snapshots[-1].router is not None and watcher.snapshots[-1].router.router_id == "r"


def test_watch_rereads_after_reconnect(
    registry: Registry, keys: Keys, redis_client: redis.Redis, watch_client: Callable[[], redis.Redis]
) -> None:
    """Kill the watcher's pub/sub connection, change the registry while it is gone: the re-read catches it."""
    watched = watch_client()
    watched.client_setname("watcher")
    with Watcher(RegistryClient(watched, keys), resync_s=30, poll_s=0.05, retry_s=0.1) as watcher:
        watcher.wait_for(0)
        killed = redis_client.client_kill_filter(_type="pubsub", skipme=True)
        assert killed >= 1
        redis_client.incr(keys.epoch)  # no event: only a re-read after reconnecting can see it
        watcher.wait_for(1, timeout=5)
        train_and_activate(registry, "shoes", "fp1")  # and events flow again afterwards
        watcher.wait_for(2, timeout=5)
    assert watcher.epochs == [0, 1, 2]
