"""registry/reader.py: atomic snapshots under concurrent writes and a watch that never misses an epoch."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import redis

from registry.errors import RecordError
from registry.keys import Keys
from registry.reader import RegistryClient, Tombstones
from registry.records import CompartmentStatus, RegistrySnapshot, RouterRecord, Tombstone, to_hash
from registry.writer import Registry
from tests.registry.conftest import train_and_activate

pytestmark = pytest.mark.services


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


# --------------------------------------------------------------------------------------------- tombstones


def test_tombstones_are_read_per_source_and_unreadable_ones_still_count(
    registry: Registry, keys: Keys, redis_client: redis.Redis
) -> None:
    train_and_activate(registry, "shoes", "fp1")
    train_and_activate(registry, "bags", "fp1")
    reader = RegistryClient(redis_client, keys)
    assert reader.tombstone("shoes") is None and reader.tombstones() == Tombstones({}, {})
    assert reader.active_ids() == {"shoes@v1", "bags@v1"}
    tomb = Tombstone("shoes", 1_700_000_100.0, 3, "req-1", {"t:0": 9}, ("a" * 64,))
    redis_client.hset(keys.tombstone("shoes"), mapping=to_hash(tomb))  # type: ignore[arg-type]
    redis_client.hset(keys.tombstone("bags"), mapping={"forgotten_at": "yesterday"})
    # a tombstone of a source the registry never registered (forgotten before it trained) is read when asked for
    redis_client.hset(keys.tombstone("hats"), mapping=to_hash(dataclasses.replace(tomb, source="hats")))  # type: ignore[arg-type]
    assert reader.tombstone("shoes") == tomb
    with pytest.raises(RecordError, match=r"Tombstone\.forgotten_at = 'yesterday'"):
        reader.tombstone("bags")
    found = reader.tombstones()
    assert found.by_source == {"shoes": tomb} and set(found.unreadable) == {"bags"}
    assert "forgotten_at" in found.unreadable["bags"] and found.sources == {"shoes", "bags"}
    assert set(reader.tombstones(also=["hats"]).by_source) == {"shoes", "hats"}


def test_iter_checks_yields_on_subscribe_on_events_and_on_resync(
    keys: Keys, watch_client: Callable[[], redis.Redis]
) -> None:
    def count_checks(resync_s: float, publish: bool, want: int) -> float:
        """Seconds until ``iter_checks`` yielded ``want`` times (one event published after the first check)."""
        stop = threading.Event()
        checks: list[float] = []
        start = time.monotonic()

        def run() -> None:
            for _ in client.iter_checks(stop, resync_s=resync_s):
                checks.append(time.monotonic())

        thread = threading.Thread(target=run)
        thread.start()
        try:
            while len(checks) < want and time.monotonic() - start < 10:
                if publish and len(checks) == 1:
                    watch_client().publish(keys.events, "{}")
                    publish = False
                time.sleep(0.01)
        finally:
            stop.set()
            thread.join(timeout=5)
        assert not thread.is_alive() and len(checks) >= want, checks
        return checks[want - 1] - start

    client = RegistryClient(watch_client(), keys)
    assert count_checks(30.0, publish=True, want=2) < 5, "a check on subscribing, one per event long before resync"
    assert count_checks(0.2, publish=False, want=3) < 5, "and one at least every resync_s without events"
