"""The training worker's jobs through the shared lifecycle, against the real Redis (issue 8, items 1, 6, 9, 11).

Each replica is a worker with its own spool over one registry and one artifact store, as in a deployment; jobs
are run one at a time with ``run_one`` (the worker thread's body), so retries and failures are observable.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import numpy as np
import pytest
import redis
from prometheus_client import CollectorRegistry

from cdm.artifacts import ArtifactStore, DirectoryStore, sha256_bytes
from cdm.config import LibraryConfig, ModelConfig, RouterConfig, TrainConfig
from cdm.data import SourceData, fingerprint, load_digits
from cdm.errors import StoreError
from cdm.lifecycle import FORGET_STEPS, ForgetReceipt, data_key, work_dir
from cdm.training import slice_of
from daemon.metrics import Metrics
from daemon.spool import Spool, SpoolState
from daemon.wire import Origin, Seal
from daemon.worker import Job, Notices, RetryPolicy, TrainingWorker
from registry.coordination import Coordinator
from registry.errors import RecordError
from registry.keys import Keys
from registry.records import CompartmentStatus
from registry.writer import Registry

pytestmark = pytest.mark.services

# smaller than tests/cdm's TINY_* and one thread each: a trained source costs well under a second on a busy CPU
MODEL = ModelConfig(sample_size=8, block_out_channels=(8, 16), norm_num_groups=4, num_classes=10)
TRAIN = TrainConfig(steps=4, batch_size=16, warmup_steps=1, checkpoint_every=2, lr=1e-3, threads=1)
ROUTER = RouterConfig(steps=8, batch_size=32, channels=(8, 16), eval_samples=32, threads=1)
LIB = LibraryConfig(model=MODEL, train=TRAIN, router=ROUTER)
TOPIC = "cdm.sources"
FAST_RETRY = RetryPolicy(max_attempts=3, initial_s=0.01, max_s=0.02)


@pytest.fixture(autouse=True)
def restore_torch_threads() -> Iterator[None]:
    """The configs here train on one thread (``threads = 1`` sets torch's global count): put it back after."""
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


class SimulatedCrash(BaseException):
    """A process dying between two steps (BaseException: nothing in the worker may catch it)."""


@dataclass
class Recorded:
    """What the worker told the poll thread."""

    registered: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    done: list[Origin] = field(default_factory=list)
    training_failed: list[tuple[str, str]] = field(default_factory=list)
    control_failed: list[tuple[Origin, str]] = field(default_factory=list)

    def notices(self) -> Notices:
        return Notices(
            self.registered.append,
            self.dropped.append,
            self.done.append,
            lambda s, d: self.training_failed.append((s, d)),
            lambda o, d: self.control_failed.append((o, d)),
        )


def unreachable(method: str) -> Exception:
    return redis.ConnectionError(f"injected: Redis unreachable during {method}")


class FlakyRegistry(Registry):
    """The real registry, except that chosen methods raise (by default a Redis connection error) the first ``n``
    times."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.failures: dict[str, int] = {}
        self.errors: dict[str, Callable[[str], Exception]] = {}

    def fail(self, method: str, times: int = 1, error: Callable[[str], Exception] = unreachable) -> None:
        self.failures[method] = times
        self.errors[method] = error

    def __getattribute__(self, name: str) -> Any:
        attr = super().__getattribute__(name)
        failures = super().__getattribute__("__dict__").get("failures", {})
        if failures.get(name, 0) > 0 and callable(attr):
            error = super().__getattribute__("errors")[name]

            def failing(*args: Any, **kwargs: Any) -> Any:
                failures[name] -= 1
                raise error(name)

            return failing
        return attr


@dataclass
class Replica:
    """One daemon's worker side: its own spool, the shared registry and artifact store."""

    worker: TrainingWorker
    spool: Spool
    registry: FlakyRegistry
    recorded: Recorded
    root: Path

    def stage(self, source: str, data: SourceData, offset: int, partition: int = 0) -> None:
        """Stage ``data`` as one chunk and its seal, read at ``offset`` and ``offset + 1`` of ``partition``."""
        assert self.spool.stage_chunk(source, 0, data, (TOPIC, partition, offset))
        seal = Seal(source, 1, fingerprint(data), len(data))
        assert self.spool.seal(source, seal, (TOPIC, partition, offset + 1))

    def run(self, job: Job) -> bool:
        return self.worker.run_one(job)

    def run_retries(self, timeout_s: float = 5.0) -> None:
        """Run every job waiting for a retry until none is left."""
        deadline = time.monotonic() + timeout_s
        while self.worker.pending() or self.worker.waiting():
            assert time.monotonic() < deadline, "retries did not finish"
            job = self.worker.next_job(timeout=0.05)
            if job is not None:
                self.run(job)


@pytest.fixture
def keys(redis_namespace: str) -> Keys:
    return Keys(redis_namespace)


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return DirectoryStore((tmp_path / "artifacts").resolve())


@pytest.fixture
def make_replica(
    tmp_path: Path, redis_client: redis.Redis, keys: Keys, store: ArtifactStore
) -> Iterator[Callable[..., Replica]]:
    spools: list[Spool] = []

    def make(name: str = "a", *, library: LibraryConfig = LIB, **kwargs: Any) -> Replica:
        registry = FlakyRegistry(redis_client, keys)
        spool = Spool(tmp_path / name / "spool")
        spools.append(spool)
        recorded = Recorded()
        kwargs.setdefault("retry", FAST_RETRY)
        worker = TrainingWorker(
            registry=registry,
            coordinator=Coordinator(redis_client, keys),
            spool=spool,
            store=store,
            work_root=tmp_path / name / "work",
            library=library,
            daemon_id=name,
            lock_ttl_s=60.0,
            notices=recorded.notices(),
            metrics=Metrics(CollectorRegistry()),
            **kwargs,
        )
        return Replica(worker, spool, registry, recorded, tmp_path / name)

    yield make
    for s in spools:
        s.close()


@pytest.fixture(scope="module")
def sources() -> dict[str, SourceData]:
    d = load_digits()
    assert d.labels is not None
    low = d.subset(np.flatnonzero(d.labels <= 2)[:120])
    high = d.subset(np.flatnonzero(d.labels >= 3)[:120])
    return {"low": low, "high": high}


def trained(replica: Replica, sources: dict[str, SourceData]) -> None:
    """Both sources trained and routed by ``replica``."""
    for i, (name, data) in enumerate(sources.items()):
        replica.stage(name, data, offset=10 * i)
        assert replica.run(Job("train", name))
    assert replica.run(Job("retrain-router"))
    snap = replica.registry.snapshot()
    assert {c.source for c in snap.compartments} == set(sources) and snap.router is not None


def state(replica: Replica) -> dict[str, Any]:
    """What a forget must leave behind: the composition, the router's coverage and every stored key."""
    snap = replica.registry.snapshot()
    return {
        "active": {c.source: (c.fingerprint, c.n_samples) for c in snap.compartments},
        "routed": sorted(c.rsplit("@", 1)[0] for c in snap.router.compartment_ids) if snap.router else None,
        "keys": sorted(k.split("/", 2)[0] + "/" + k.split("/")[1].split("@")[0] for k in replica.worker.store.list()),
    }


def receipts(replica: Replica) -> list[dict[str, Any]]:
    return [a for a in replica.registry.audit(1000) if a.get("kind") == "forget-complete"]


def control(offset: int) -> Origin:
    return Origin("cdm.control", 0, offset)


# --------------------------------------------------------------------------------------------- forget-samples


def test_forget_samples_with_no_matching_id_is_a_noop_with_a_receipt(
    make_replica: Callable[..., Replica], sources: dict[str, SourceData]
) -> None:
    a = make_replica()
    trained(a, sources)
    before = a.registry.snapshot()
    low = before.by_source()["low"]
    kept = [*a.worker.store.list(f"compartments/{low.compartment_id}"), data_key("low", low.fingerprint)]
    job = Job("forget-samples", "low", (10**9, 10**9 + 1), origin=control(0), request_id="no-match")
    assert a.run(job)
    assert a.recorded.done == [control(0)]
    receipt = ForgetReceipt.from_dict(a.registry.receipt("no-match") or {})
    assert receipt.outcome == "no-match" and receipt.n_samples_removed == 0 and receipt.deleted_files == ()
    assert receipt.unmatched_ids == (10**9, 10**9 + 1) and receipt.n_unmatched == 2
    assert set(receipt.untouched) == {c.compartment_id for c in before.compartments if c.source != "low"}
    # the live compartment and the source's only data are still there, and the router can still be retrained
    assert a.registry.snapshot().compartment_ids == before.compartment_ids
    assert all(a.worker.store.exists(k) for k in kept)
    assert a.run(Job("retrain-router"))
    assert set(a.registry.snapshot().router.compartment_ids) == set(before.compartment_ids)  # type: ignore[union-attr]


def test_a_redelivered_forget_samples_is_acknowledged_again_without_redoing_it(
    make_replica: Callable[..., Replica], sources: dict[str, SourceData]
) -> None:
    a = make_replica()
    trained(a, sources)
    ids = tuple(int(i) for i in sources["low"].ids[:5])
    job = Job("forget-samples", "low", ids, origin=control(1), request_id="gdpr-7")
    assert a.run(job)
    first = a.registry.snapshot()
    assert first.by_source()["low"].compartment_id == "low@v2" and first.by_source()["low"].n_samples == 115
    receipt = a.registry.receipt("gdpr-7")
    assert receipt is not None and receipt["outcome"] == "samples-forgotten" and receipt["n_samples_removed"] == 5
    assert receipt["retired"] == ["low@v1"] and receipt["new_compartment"] == "low@v2"
    assert any("compartments/low@v1/" in unquote(u) for u in receipt["deleted_files"])
    assert a.registry.get("low@v1").fingerprint == "" and a.registry.get("low@v1").lineage == {}  # scrubbed
    # the same record again (a redelivery after a crash before the commit): acknowledged, nothing redone
    assert a.run(job)
    assert a.recorded.done == [control(1), control(1)]
    assert a.registry.snapshot() == first
    assert [r.version for r in a.registry.history("low")] == [1, 2]
    assert len(receipts(a)) == 1 and a.registry.receipt("gdpr-7") == receipt


def test_a_redis_failure_inside_forget_samples_deletes_nothing_and_the_retry_completes_it(
    make_replica: Callable[..., Replica], sources: dict[str, SourceData]
) -> None:
    a = make_replica()
    trained(a, sources)
    before = a.registry.snapshot()
    low = before.by_source()["low"]
    old = [*a.worker.store.list(f"compartments/{low.compartment_id}"), data_key("low", low.fingerprint)]
    a.registry.fail("begin_training")  # Redis goes away when the retrained version is registered
    job = Job("forget-samples", "low", (int(sources["low"].ids[0]),), origin=control(2), request_id="r-fail")
    assert not a.run(job)
    assert a.recorded.done == [] and a.registry.receipt("r-fail") is None
    assert a.registry.snapshot().compartment_ids == before.compartment_ids
    assert all(a.worker.store.exists(k) for k in old), "nothing of the live compartment may go before the new one"
    a.run_retries()
    assert a.recorded.done == [control(2)] and a.registry.receipt("r-fail") is not None
    assert a.registry.snapshot().by_source()["low"].n_samples == len(sources["low"]) - 1
    assert not any(a.worker.store.exists(k) for k in old)


def test_sigterm_mid_retrain_is_not_reported_complete_and_a_rerun_completes_it_once(
    make_replica: Callable[..., Replica], sources: dict[str, SourceData]
) -> None:
    library = dataclasses.replace(LIB, train=dataclasses.replace(TRAIN, steps=12, checkpoint_every=2))
    a = make_replica(library=library)
    trained(a, sources)
    before = a.registry.snapshot()
    steps = [0]
    gauge = a.worker.metrics.training_loss  # type: ignore[union-attr]

    class StopAtStep4:  # SIGTERM arrives while the retrained compartment is at step 4
        def set(self, value: float) -> None:
            steps[0] += 1
            gauge.set(value)
            if steps[0] == 4:
                a.worker._stopping.set()

    a.worker.metrics.training_loss = StopAtStep4()  # type: ignore[union-attr,assignment]
    ids = tuple(int(i) for i in sources["low"].ids[:3])
    job = Job("forget-samples", "low", ids, origin=control(3), request_id="r-term")
    assert not a.run(job)
    assert a.recorded.done == [] and receipts(a) == [] and a.registry.receipt("r-term") is None
    assert a.registry.snapshot().compartment_ids == before.compartment_ids  # the old version still serves
    assert a.worker.waiting() == 0, "an interrupted job is not retried: it is redelivered after the restart"
    # the restarted daemon gets the record again and finishes the request, resuming the checkpoint
    a.worker._stopping.clear()
    assert a.run(job)
    assert a.recorded.done == [control(3)] and len(receipts(a)) == 1
    low = a.registry.snapshot().by_source()["low"]
    assert low.n_samples == len(sources["low"]) - 3 and low.train_metrics["resumed_from"] > 0


def test_with_sisa_slices_another_replica_retrains_only_from_the_checkpoint_before_the_forgotten_slice(
    make_replica: Callable[..., Replica], sources: dict[str, SourceData], store: ArtifactStore
) -> None:
    library = dataclasses.replace(LIB, train=dataclasses.replace(TRAIN, steps=8, slices=4))  # slice j ends at 2j
    a = make_replica("a", library=library)
    trained(a, sources)
    low = a.registry.snapshot().by_source()["low"]
    assert not [rel for rel in low.files if rel.startswith("slices/")], "samplers never fetch the checkpoints"

    def checkpoints(cid: str) -> dict[str, str]:
        prefix = f"compartments/{cid}/"
        return {k[len(prefix) :]: sha256_bytes(store.get_bytes(k)) for k in store.list(f"{prefix}slices")}

    old = checkpoints(low.compartment_id)
    assert len(old) == 6  # after slices 1..3: tensors + JSON each
    # replica b (its own work dir) forgets samples of slices 3 and 4: the checkpoints come through the store
    data = sources["low"]
    ids = tuple(int(i) for i in data.ids[slice_of(data.ids, 4) >= 2][:3])
    b = make_replica("b", library=library)
    assert b.run(Job("forget-samples", "low", ids, origin=control(9), request_id="sisa-1"))
    receipt = b.registry.receipt("sisa-1")
    assert receipt is not None and receipt["new_compartment"] == "low@v2"
    assert (receipt["slices"], receipt["resumed_from_slice"], receipt["steps_retrained"]) == (4, 2, 4)
    new = checkpoints("low@v2")
    assert new.keys() == old.keys() and checkpoints("low@v1") == {}
    assert {r for r in new if new[r] == old[r]} == {r for r in old if r.startswith(("slices/1/", "slices/2/"))}
    assert b.registry.get("low@v2").train_metrics["base_slice"] == 2


@pytest.mark.parametrize("kind", ["forget-source", "forget-samples"])
@pytest.mark.parametrize("crash_after", FORGET_STEPS[:-1])
def test_a_crash_after_any_step_is_finished_by_a_rerun(
    make_replica: Callable[..., Replica], sources: dict[str, SourceData], kind: str, crash_after: str
) -> None:
    """Kill the worker after step k (the journal holds steps 1..k), restart, get the record again: the same end
    state as without the crash, nothing resurrected, one receipt."""

    def crash(step: str) -> None:
        if step == crash_after:
            raise SimulatedCrash(step)

    a = make_replica("a", after_step=crash)
    trained(a, sources)
    ids = tuple(int(i) for i in sources["low"].ids[:4]) if kind == "forget-samples" else ()
    job = Job(kind, "low", ids, origin=control(4), request_id=f"crash-{kind}")  # type: ignore[arg-type]
    with pytest.raises(SimulatedCrash):
        a.run(job)
    assert a.registry.receipt(job.request_id) is None and a.recorded.done == []
    restarted = make_replica("a2")  # a new process: the journal in the registry is all it knows
    assert restarted.run(job)
    assert restarted.recorded.done == [control(4)] and len(receipts(restarted)) == 1
    end = state(restarted)
    if kind == "forget-source":
        assert end == {"active": {"high": end["active"]["high"]}, "routed": ["high"], "keys": end["keys"]}
        assert not [k for k in end["keys"] if "low" in k], "nothing of the forgotten source may be left"
        assert restarted.registry.tombstone("low") is not None
    else:
        assert end["active"]["low"][1] == len(sources["low"]) - 4 and end["routed"] == ["high", "low"]
        versions = [(r.version, r.status) for r in restarted.registry.history("low")]
        assert versions == [(1, CompartmentStatus.RETIRED), (2, CompartmentStatus.ACTIVE)]
        assert not restarted.worker.store.list("compartments/low@v1"), "the old version's artifact is deleted"
    stored = restarted.worker.store.list()
    assert sum(k.startswith("routers/") for k in stored) == 3, "one router (3 files) is left: the active one"


# --------------------------------------------------------------------------------------------- replicas, tombstones


def test_a_source_staged_on_another_replica_before_the_forget_is_dropped_not_trained(
    make_replica: Callable[..., Replica], sources: dict[str, SourceData]
) -> None:
    a, b = make_replica("a"), make_replica("b")
    a.stage("low", sources["low"], offset=0)
    assert a.run(Job("train", "low"))
    # a rebalance handed the uncommitted records of "low" to b, which staged them in its own spool ...
    b.stage("low", sources["low"], offset=0)
    # ... then a forget ran on a (it owns the control partition)
    assert a.run(Job("forget-source", "low", origin=control(5), request_id="forget-low"))
    assert b.run(Job("train", "low"))
    assert b.registry.snapshot().compartments == () and [r.version for r in b.registry.history("low")] == [1]
    assert b.recorded.dropped == ["low"] and b.spool.state("low") is None
    assert not b.worker.store.list("data/low") and not b.worker.store.list("compartments")
    # a push of the same id after the forget is a new source
    b.stage("low", sources["low"].subset(np.arange(100)), offset=50)
    assert b.run(Job("train", "low"))
    assert b.registry.snapshot().by_source()["low"].compartment_id == "low@v2"


def test_forgetting_a_source_leaves_sources_sharing_its_prefix_alone(
    make_replica: Callable[..., Replica], sources: dict[str, SourceData]
) -> None:
    a = make_replica()
    a.stage("shoes", sources["low"], offset=0)
    assert a.run(Job("train", "shoes"))
    # shoes-v2 is mid-training: its resumable checkpoint is all there is of it so far
    work = a.root / "work" / "work" / f"shoes-v2-{fingerprint(sources['high'])[:16]}"
    (work / "train_state").mkdir(parents=True)
    (work / "train_state" / "state.json").write_text("{}")
    a.worker.store.put_bytes(data_key("shoes-v2", fingerprint(sources["high"])), b"kept copy of shoes-v2")
    assert a.run(Job("forget-source", "shoes", origin=control(6), request_id="forget-shoes"))
    assert (work / "train_state" / "state.json").exists()
    assert a.worker.store.list("data/shoes-v2") and not a.worker.store.list("data/shoes")
    receipt = a.registry.receipt("forget-shoes") or {}
    assert receipt["deleted_files"] and not [u for u in receipt["deleted_files"] if "shoes-v2" in u]


def test_a_forget_that_lands_while_its_source_trains_leaves_nothing_of_it(
    make_replica: Callable[..., Replica], sources: dict[str, SourceData], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = make_replica("a"), make_replica("b")
    a.stage("low", sources["low"], offset=0)
    on_step = a.worker._on_step
    forgotten: list[bool] = []

    def forget_mid_training(source: str, step: int, steps: int, loss: float) -> None:
        on_step(source, step, steps, loss)
        if not forgotten:  # another replica (it owns the control partition) forgets the source at the first step
            forgotten.append(b.run(Job("forget-source", "low", origin=control(7), request_id="forget-mid")))

    monkeypatch.setattr(a.worker, "_on_step", forget_mid_training)
    a.run(Job("train", "low"))
    assert forgotten == [True] and b.registry.receipt("forget-mid") is not None
    assert a.recorded.registered == [] and a.recorded.dropped == ["low"] and a.spool.state("low") is None
    assert a.registry.snapshot().compartments == ()
    assert all(r.status is not CompartmentStatus.ACTIVE for r in a.registry.history("low"))
    # nothing trained on the forgotten data is left: not the uploaded weights, not the data copy, not the local
    # checkpoints and artifact of the training replica (the forget's delete step ran before they existed)
    assert not a.worker.store.list("data/low") and not a.worker.store.list("compartments"), a.worker.store.list()
    assert not [p for p in (a.root / "work").rglob("*") if p.is_file()], list((a.root / "work").rglob("*"))


def test_checkpoints_of_a_training_interrupted_before_the_forget_are_deleted_when_it_is_dropped(
    make_replica: Callable[..., Replica], sources: dict[str, SourceData]
) -> None:
    a, b = make_replica("a"), make_replica("b")
    a.stage("low", sources["low"], offset=0)
    checkpoint = work_dir(a.root / "work", "low", fingerprint(sources["low"])) / "train_state" / "state.json"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_text("{}")  # a run stopped mid-training (SIGTERM, a Redis outage) left its checkpoint
    assert b.run(Job("forget-source", "low", origin=control(8), request_id="forget-low"))
    a.run(Job("train", "low"))  # the retry finds the source forgotten
    assert a.recorded.dropped == ["low"] and a.spool.state("low") is None
    assert not checkpoint.exists() and not [p for p in (a.root / "work").rglob("*") if p.is_file()]


# --------------------------------------------------------------------------------------------- retries


def test_a_training_job_that_hits_a_redis_outage_is_retried_and_registered_once(
    make_replica: Callable[..., Replica], sources: dict[str, SourceData]
) -> None:
    a = make_replica()
    a.stage("low", sources["low"], offset=0)
    a.registry.fail("activate")
    assert not a.run(Job("train", "low"))
    assert a.recorded.registered == [] and a.worker.waiting() == 1
    assert a.worker.idle(), "a job waiting for its retry does not pause ingest"
    a.run_retries()
    assert a.recorded.registered == ["low"] and a.recorded.training_failed == []
    assert [r.version for r in a.registry.history("low")] == [1]
    assert a.spool.state("low") == SpoolState.REGISTERED


def test_a_source_that_keeps_failing_is_given_up_after_max_attempts(
    make_replica: Callable[..., Replica], sources: dict[str, SourceData]
) -> None:
    a = make_replica()
    a.stage("low", sources["low"], offset=0)
    a.registry.fail("begin_training", times=100, error=lambda m: RecordError(f"injected: a corrupt record in {m}"))
    assert not a.run(Job("train", "low"))
    a.run_retries()
    assert a.recorded.registered == [] and a.worker.waiting() == 0
    ((source, why),) = a.recorded.training_failed
    assert source == "low" and "failed 3 times" in why and "a corrupt record" in why


def test_a_redis_outage_longer_than_the_retries_never_gives_a_source_up(
    make_replica: Callable[..., Replica], sources: dict[str, SourceData]
) -> None:
    a = make_replica()
    a.stage("low", sources["low"], offset=0)
    outage = 4 * FAST_RETRY.max_attempts  # failed runs: far more than a source may fail on its own
    a.registry.fail("begin_training", times=outage)
    assert not a.run(Job("train", "low"))
    a.run_retries(timeout_s=30)
    assert a.recorded.training_failed == [] and a.recorded.registered == ["low"]
    assert a.registry.failures["begin_training"] == 0, "every injected failure was hit"
    assert [r.version for r in a.registry.history("low")] == [1]
    assert a.spool.state("low") == SpoolState.REGISTERED


def test_outage_failures_back_off_but_do_not_count_as_attempts(
    make_replica: Callable[..., Replica], sources: dict[str, SourceData], monkeypatch: pytest.MonkeyPatch
) -> None:
    a = make_replica(retry=RetryPolicy(max_attempts=2, initial_s=10.0, max_s=40.0))
    a.stage("low", sources["low"], offset=0)
    retries: list[Job] = []
    monkeypatch.setattr(a.worker, "submit", retries.append)  # the retries, instead of queueing them
    a.registry.fail("begin_training", times=3)
    job = Job("train", "low")
    for outages, delay in ((1, 10.0), (2, 20.0), (3, 40.0)):  # the back-off doubles up to max_s
        before = time.monotonic()
        assert not a.run(job)
        job = retries.pop()
        assert (job.attempt, job.outages) == (0, outages)
        assert before + delay <= job.not_before <= time.monotonic() + delay
    corrupt = lambda m: RecordError(f"injected: a corrupt record in {m}")  # noqa: E731
    a.registry.fail("begin_training", times=2, error=corrupt)
    assert not a.run(job)  # the first failure of its own: one attempt left
    job = retries.pop()
    assert (job.attempt, job.outages) == (1, 3) and a.recorded.training_failed == []
    assert not a.run(job)
    assert retries == [] and [s for s, _ in a.recorded.training_failed] == ["low"]


# --------------------------------------------------------------------------------------------- artifact paths


def test_paths_from_the_registry_are_confined_to_the_artifact_store(
    make_replica: Callable[..., Replica], sources: dict[str, SourceData], tmp_path: Path, redis_client: redis.Redis
) -> None:
    a = make_replica()
    trained(a, sources)
    victim = tmp_path / "victim.txt"
    victim.write_text("not an artifact")
    # someone who can write Redis plants a path outside the store in a forget request's journal ...
    job = Job("forget-source", "low", origin=control(7), request_id="tampered")
    a.registry.save_journal(
        "tampered",
        {
            "request_id": "tampered",
            "kind": "forget-source",
            "source": "low",
            "sample_ids": [],
            "started_at": time.time(),
            "done": ["plan", "retire", "keep", "train", "scrub", "router"],
            "mode": "source",
            "delete_uris": [victim.as_uri()],
        },
    )
    assert not a.run(job)
    assert victim.read_text() == "not an artifact"
    assert "outside this store" in a.worker.status.last_error
    # ... or a fingerprint that would make a data key leave its directory
    key = a.registry.keys.compartment("high@v1")
    redis_client.hset(key, "fingerprint", "../../" + victim.name)
    with pytest.raises(StoreError, match="malformed"):
        a.worker.lifecycle().retrain_router()
    assert victim.exists()


# --------------------------------------------------------------------------------------------- object store


@pytest.mark.slow
def test_train_and_forget_on_an_s3_store_lists_the_deleted_objects(
    make_replica: Callable[..., Replica], sources: dict[str, SourceData], s3_endpoint: str, s3_bucket: str
) -> None:
    from cdm.artifacts import open_store
    from tests.cdm.artifacts.conftest import s3_config

    s3 = open_store(s3_config(s3_endpoint, s3_bucket, prefix="cdm"), environ={})
    a = make_replica()
    a.worker.store = s3
    trained(a, sources)
    snap = a.registry.snapshot()
    low = snap.by_source()["low"]
    assert low.artifact_uri == f"s3://{s3_bucket}/cdm/compartments/low@v1/"
    assert all(f.uri.startswith(f"s3://{s3_bucket}/cdm/compartments/low@v1/") for f in low.files.values())
    objects = {s3.url(k) for k in s3.list("compartments/low@v1")} | {s3.url(data_key("low", low.fingerprint))}
    assert a.run(Job("forget-source", "low", origin=control(8), request_id="s3-forget"))
    receipt = a.registry.receipt("s3-forget") or {}
    assert objects <= set(receipt["deleted_files"])
    assert not s3.list("compartments/low@v1") and not s3.list("data/low")
    assert set(receipt["untouched"]) == {"high@v1"} and receipt["router_after"] != receipt["router_before"]
    assert json.dumps(receipt)  # JSON all the way


def test_data_kept_by_an_older_daemon_is_still_used_and_forgotten(
    make_replica: Callable[..., Replica], sources: dict[str, SourceData]
) -> None:
    """Daemons before the shared lifecycle kept one data file per source, data/<source>.npz."""
    a = make_replica()
    trained(a, sources)
    store = a.worker.store
    low = a.registry.snapshot().by_source()["low"]
    store.put_bytes("data/low.npz", store.get_bytes(data_key("low", low.fingerprint)))
    store.delete(data_key("low", low.fingerprint))
    assert a.run(Job("retrain-router"))  # the router still trains on it
    assert a.run(Job("forget-source", "low", origin=control(9), request_id="legacy"))
    assert (
        not store.exists("data/low.npz")
        and store.url("data/low.npz") in (a.registry.receipt("legacy") or {})["deleted_files"]
    )
