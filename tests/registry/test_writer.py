"""registry/writer.py against the real redis-server of deploy/local/services.py (no mocks)."""

from __future__ import annotations

import json
import threading
import time

import pytest
import redis

from registry.errors import CompartmentNotFound, InvalidTransition, RecordError
from registry.keys import Keys, compartment_id, parse_compartment_id
from registry.records import CompartmentStatus, RegistrySnapshot, RouterRecord, RoutingKind, StoredFile
from registry.writer import Registry
from tests.registry.conftest import SHA, train_and_activate

pytestmark = pytest.mark.services


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
    registry.begin_training("shoes", "fp2", {"chunks": [{"origin": ["t", 0, 5]}]})  # v2 still training
    tomb = registry.forget_source(
        "shoes", request_id="gdpr-42", reason="GDPR request 42", through={"t:0": 5}, files_sha256=["ab" * 32]
    )
    assert tomb.source == "shoes" and tomb.request_id == "gdpr-42" and tomb.through == {"t:0": 5}
    assert set(tomb.compartment_ids) == {"shoes@v1", "shoes@v2"} and tomb.files_sha256 == ("ab" * 32,)
    assert tomb.epoch == 3 == registry.epoch()  # exactly one bump for the forget
    assert registry.snapshot().compartment_ids == ("bags@v1",)
    assert registry.tombstone("shoes") == tomb and registry.tombstone("bags") is None
    for record in registry.history("shoes"):
        assert record.status is CompartmentStatus.RETIRED
        assert record.retired_reason == "forgotten: GDPR request 42"
        # scrubbed: nothing of the forgotten data's identity or origin stays
        assert record.fingerprint == "" and record.lineage == {}
        raw = redis_client.hgetall(keys.compartment(record.compartment_id))
        assert b"fingerprint" not in raw or raw[b"fingerprint"] == b""
        assert b"fp1" not in b"".join(raw.values()) and b"origin" not in b"".join(raw.values())
    assert registry.compartment_for_fingerprint("shoes", "fp1") is None  # same data again trains afresh
    audit = registry.audit()
    assert audit[0]["kind"] == "forget" and audit[0]["request_id"] == "gdpr-42"
    assert redis_client.hget(keys.source("shoes"), "current") is None
    # idempotent per request: the same request returns the same tombstone and changes nothing
    assert registry.forget_source("shoes", request_id="gdpr-42") == tomb and registry.epoch() == 3
    # the version counter is not reset: ids are never reused
    assert registry.begin_training("shoes", "fp1", {}).compartment_id == "shoes@v3"
    # a later request replaces the tombstone (retiring what was trained since)
    later = registry.forget_source("shoes", request_id="gdpr-43")
    assert later.compartment_ids == ("shoes@v3",) and later.forgotten_at > tomb.forgotten_at
    assert registry.epoch() == 3  # only a training compartment went: the composition did not change
    # a one-off forget (no request id: an operator at the registry) gets an id of its own
    one_off = registry.forget_source("bags", "operator")
    assert one_off.request_id.startswith("registry-") and one_off.compartment_ids == ("bags@v1",)


def test_scrub_only_retired(registry: Registry) -> None:
    train_and_activate(registry, "shoes", "fp1")
    with pytest.raises(InvalidTransition, match="only retired"):
        registry.scrub("shoes@v1")
    train_and_activate(registry, "shoes", "fp2")
    scrubbed = registry.scrub("shoes@v1")
    assert scrubbed.fingerprint == "" and registry.get("shoes@v1").lineage == {}
    assert registry.compartment_for_fingerprint("shoes", "fp1") is None
    assert registry.compartment_for_fingerprint("shoes", "fp2") is not None


def test_journal_and_receipts_once_per_request(registry: Registry) -> None:
    assert registry.journal("r1") is None and registry.receipt("r1") is None
    registry.save_journal("r1", {"done": ["plan"], "source": "shoes"})
    registry.save_journal("r1", {"done": ["plan", "retire"], "source": "shoes"})
    assert registry.journal("r1") == {"done": ["plan", "retire"], "source": "shoes"}
    assert registry.put_receipt("r1", {"request_id": "r1", "deleted_files": ["file:///a"]})
    assert not registry.put_receipt("r1", {"request_id": "r1", "deleted_files": []})  # first write wins
    assert registry.receipt("r1") == {"request_id": "r1", "deleted_files": ["file:///a"]}
    done = [a for a in registry.audit() if a["kind"] == "forget-complete"]
    assert len(done) == 1 and done[0]["deleted_files"] == ["file:///a"]


def test_activate_records_files_and_router_priors(registry: Registry) -> None:
    rec = registry.begin_training("shoes", "fp", {})
    files = {"unet/w.safetensors": StoredFile("file:///s/w", "cd" * 32, 3)}
    active = registry.activate(
        rec.compartment_id,
        artifact_uri="file:///s/",
        prior=1.0,
        class_counts=[1],
        n_samples=1,
        train_metrics={},
        files=files,
    )
    assert active.files == files and active.sha256 == {"unet/w.safetensors": "cd" * 32}
    train_and_activate(registry, "bags", "fp", n=3)
    registry.set_router(RouterRecord("r1", "/r", {}, ("shoes@v1", "bags@v1"), 2), priors={"shoes@v1": 0.25, "x@v1": 1})
    assert registry.get("shoes@v1").prior == 0.25 and registry.get("bags@v1").prior == 3.0  # only those given


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


def test_routing_kind_is_a_registry_fact_in_the_snapshot(
    registry: Registry, redis_client: redis.Redis, keys: Keys
) -> None:
    train_and_activate(registry, "shoes", "fp1")
    assert registry.routing() is RoutingKind.LEARNT and registry.snapshot().routing is RoutingKind.LEARNT  # unset
    assert registry.set_routing("learnt") == 1  # the kind in force (the default): no composition change
    assert redis_client.get(keys.routing) in (b"learnt", "learnt") and registry.epoch() == 1
    # a new kind changes how every sampler composes: one epoch bump, one change-log entry, in the snapshot
    assert registry.set_routing("density") == 2
    snap = registry.snapshot()
    assert snap.routing is RoutingKind.DENSITY and snap.epoch == 2 and snap.compartment_ids == ("shoes@v1",)
    assert registry.routing() is RoutingKind.DENSITY
    change = registry.changes()[-1]
    assert (change.kind, change.epoch, change.detail) == ("routing", 2, {"kind": "density", "previous": "learnt"})
    assert registry.set_routing(RoutingKind.DENSITY) == 2 and len(registry.changes()) == 3  # idempotent
    assert registry.set_routing("learnt") == 3 and registry.snapshot().routing is RoutingKind.LEARNT
    with pytest.raises(ValueError, match="routing kind 'bogus' is not one of"):
        registry.set_routing("bogus")
    assert registry.epoch() == 3
    redis_client.set(keys.routing, "mystery")  # written by something else: named, not silently learnt
    with pytest.raises(RecordError, match="'mystery'"):
        registry.snapshot()


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


# --------------------------------------------------------------------------------------------- change log


def test_change_stream_entries(registry: Registry) -> None:
    train_and_activate(registry, "shoes", "fp1")
    train_and_activate(registry, "shoes", "fp2")
    registry.forget_source("shoes", request_id="r1")
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
