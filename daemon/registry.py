"""The compartment registry in Redis: lifecycle, composition epoch, locks, heartbeats and change feed.

Every change that touches several keys is one MULTI/EXEC transaction; read-modify-write changes WATCH what
they read (and the epoch) and are retried by ``redis.Redis.transaction`` when another writer got there
first. The invariant readers rely on: **``epoch`` is incremented exactly once by every transaction that
changes the composition** (the active set, an active compartment's record, or the router), in the same
transaction, together with a change-log entry (``XADD``) and an event (``PUBLISH``). So a reader holding a
snapshot taken atomically with its epoch knows the composition is unchanged as long as the epoch is.

Lifecycle of a compartment (one version of one source)::

    begin_training ──> training ──activate──> active ──(newer version activated | retire | forget)──> retired
                          └──────────(retire | forget | newer training begun)────────────────────────────┘

``Registry`` is the writer (the daemon); ``RegistryClient`` is the read side for samplers, with ``watch``.
Key names live in ``daemon/keys.py``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeVar, cast

import redis
import redis.client

from daemon.errors import CompartmentNotFound, InvalidTransition
from daemon.keys import AUDIT_MAXLEN, CHANGES_MAXLEN, Keys, check_source, compartment_id, parse_compartment_id

log = logging.getLogger(__name__)

T = TypeVar("T")
Clock = Callable[[], float]


class CompartmentStatus(StrEnum):
    TRAINING = "training"
    ACTIVE = "active"
    RETIRED = "retired"


# --------------------------------------------------------------------------------------------- records


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _decode_hash(raw: Any) -> dict[str, str]:
    """HGETALL reply (dict, or flat list from Lua) with bytes or str -> dict[str, str]."""
    if isinstance(raw, Mapping):
        return {_text(k): _text(v) for k, v in raw.items()}
    items = list(raw or [])
    return {_text(items[i]): _text(items[i + 1]) for i in range(0, len(items), 2)}


@dataclass(frozen=True)
class CompartmentRecord:
    """One compartment as stored in ``ns:compartment:{id}``."""

    compartment_id: str  # "<source>@v<version>"
    source: str
    version: int  # 1, 2, ... per source; never reused
    status: CompartmentStatus
    fingerprint: str  # cdm.data.fingerprint of the data it is trained on
    lineage: dict[str, Any]  # where the data came from: topic, partitions, offsets / chunk refs
    created_at: float  # unix seconds (the registry's clock)
    updated_at: float
    artifact_uri: str = ""  # where the EMA weights + manifest are (set on activation)
    sha256: dict[str, str] = field(default_factory=dict)  # artifact file -> sha256 hex
    prior: float = 0.0  # prior weight of the compartment in the composition
    class_counts: tuple[int, ...] = ()  # samples per class
    n_samples: int = 0
    train_metrics: dict[str, Any] = field(default_factory=dict)  # e.g. final_loss, steps, seconds
    retired_reason: str = ""  # why it was retired ("replaced by x@v2", "forgotten: ...")

    def to_hash(self) -> dict[str, str]:
        return {
            "source": self.source,
            "version": str(self.version),
            "status": self.status.value,
            "fingerprint": self.fingerprint,
            "lineage": json.dumps(self.lineage, sort_keys=True),
            "created_at": repr(self.created_at),
            "updated_at": repr(self.updated_at),
            "artifact_uri": self.artifact_uri,
            "sha256": json.dumps(self.sha256, sort_keys=True),
            "prior": repr(self.prior),
            "class_counts": json.dumps(list(self.class_counts)),
            "n_samples": str(self.n_samples),
            "train_metrics": json.dumps(self.train_metrics, sort_keys=True),
            "retired_reason": self.retired_reason,
        }

    @classmethod
    def from_hash(cls, cid: str, raw: Any) -> CompartmentRecord:
        h = _decode_hash(raw)
        return cls(
            compartment_id=cid,
            source=h["source"],
            version=int(h["version"]),
            status=CompartmentStatus(h["status"]),
            fingerprint=h.get("fingerprint", ""),
            lineage=json.loads(h.get("lineage") or "{}"),
            created_at=float(h.get("created_at") or 0.0),
            updated_at=float(h.get("updated_at") or 0.0),
            artifact_uri=h.get("artifact_uri", ""),
            sha256=json.loads(h.get("sha256") or "{}"),
            prior=float(h.get("prior") or 0.0),
            class_counts=tuple(json.loads(h.get("class_counts") or "[]")),
            n_samples=int(h.get("n_samples") or 0),
            train_metrics=json.loads(h.get("train_metrics") or "{}"),
            retired_reason=h.get("retired_reason", ""),
        )


@dataclass(frozen=True)
class RouterRecord:
    """The active router, stored in ``ns:router``."""

    router_id: str  # unique per trained router
    artifact_uri: str  # where router.safetensors + config + manifest are
    sha256: dict[str, str]  # artifact file -> sha256 hex
    compartment_ids: tuple[str, ...]  # the router's logit order (K outputs)
    trained_at_epoch: int  # registry epoch of the snapshot it was trained on
    metrics: dict[str, Any] = field(default_factory=dict)  # e.g. held-out accuracy per noise level
    created_at: float = 0.0

    def to_hash(self) -> dict[str, str]:
        return {
            "router_id": self.router_id,
            "artifact_uri": self.artifact_uri,
            "sha256": json.dumps(self.sha256, sort_keys=True),
            "compartment_ids": json.dumps(list(self.compartment_ids)),
            "trained_at_epoch": str(self.trained_at_epoch),
            "metrics": json.dumps(self.metrics, sort_keys=True),
            "created_at": repr(self.created_at),
        }

    @classmethod
    def from_hash(cls, raw: Any) -> RouterRecord | None:
        h = _decode_hash(raw)
        if not h:
            return None
        return cls(
            router_id=h["router_id"],
            artifact_uri=h["artifact_uri"],
            sha256=json.loads(h.get("sha256") or "{}"),
            compartment_ids=tuple(json.loads(h.get("compartment_ids") or "[]")),
            trained_at_epoch=int(h.get("trained_at_epoch") or 0),
            metrics=json.loads(h.get("metrics") or "{}"),
            created_at=float(h.get("created_at") or 0.0),
        )


@dataclass(frozen=True)
class RegistrySnapshot:
    """The composition at one epoch, read atomically."""

    epoch: int
    compartments: tuple[CompartmentRecord, ...]  # the active ones, sorted by compartment id
    router: RouterRecord | None

    @property
    def compartment_ids(self) -> tuple[str, ...]:
        return tuple(c.compartment_id for c in self.compartments)

    def by_source(self) -> dict[str, CompartmentRecord]:
        return {c.source: c for c in self.compartments}


@dataclass(frozen=True)
class ForgetReceipt:
    """Proof that a source was removed from the composition (also kept in ``ns:forget:receipts``)."""

    receipt_id: str
    source: str
    compartment_ids: tuple[str, ...]  # compartments retired by this request (may be empty: nothing left)
    epoch: int  # registry epoch after the change (composition without the source)
    reason: str
    created_at: float

    def to_json(self) -> str:
        return json.dumps(
            {
                "receipt_id": self.receipt_id,
                "source": self.source,
                "compartment_ids": list(self.compartment_ids),
                "epoch": self.epoch,
                "reason": self.reason,
                "created_at": self.created_at,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, raw: str | bytes) -> ForgetReceipt:
        d = json.loads(raw)
        return cls(
            receipt_id=d["receipt_id"],
            source=d["source"],
            compartment_ids=tuple(d["compartment_ids"]),
            epoch=int(d["epoch"]),
            reason=d["reason"],
            created_at=float(d["created_at"]),
        )


@dataclass(frozen=True)
class ChangeEvent:
    """One entry of the change-log stream ``ns:changes``."""

    stream_id: str  # Redis stream id ("<ms>-<seq>"); pass the last one seen to ``changes(since_id)``
    epoch: int  # registry epoch after this change
    kind: str  # "training", "activated", "retired", "forgotten", "router"
    compartment_id: str | None
    source: str | None
    at: float
    detail: dict[str, Any]


@dataclass(frozen=True)
class DaemonInfo:
    """A live daemon (its heartbeat key exists)."""

    daemon_id: str
    info: dict[str, Any]  # what it reported (host, pid, version, current work, ...)
    ttl_s: float  # seconds until the heartbeat expires unless refreshed


# --------------------------------------------------------------------------------------------- scripts

# KEYS: epoch, active, router; ARGV[1]: compartment key prefix. Returns {epoch, router, id1, h1, id2, h2...}.
# Reads undeclared keys (the compartment hashes): fine on a single Redis; on a cluster use a hash-tag
# namespace such as "{cdm}" so every key lives in one slot.
_SNAPSHOT_LUA = """
local ids = redis.call('SMEMBERS', KEYS[2])
table.sort(ids)
local out = {redis.call('GET', KEYS[1]) or '0', redis.call('HGETALL', KEYS[3])}
for _, id in ipairs(ids) do
  out[#out + 1] = id
  out[#out + 1] = redis.call('HGETALL', ARGV[1] .. id)
end
return out
"""

# KEYS[1]: lock; ARGV[1]: owner. Delete only if we own it.
_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS[1]: lock; ARGV[1]: owner, ARGV[2]: ttl ms. Extend only if we own it.
_REFRESH_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

# KEYS: daemons index, daemon key; ARGV[1]: daemon id. Drop the id from the index if its key has expired.
_PRUNE_LUA = """
if redis.call('EXISTS', KEYS[2]) == 0 then return redis.call('ZREM', KEYS[1], ARGV[1]) end
return 0
"""


def _read_snapshot(script: Any, keys: Keys) -> RegistrySnapshot:
    reply = script(keys=[keys.epoch, keys.active, keys.router], args=[keys.compartment_prefix])
    epoch, router_raw, rest = int(_text(reply[0])), reply[1], reply[2:]
    compartments = tuple(
        CompartmentRecord.from_hash(_text(rest[i]), rest[i + 1]) for i in range(0, len(rest), 2) if rest[i + 1]
    )
    return RegistrySnapshot(epoch=epoch, compartments=compartments, router=RouterRecord.from_hash(router_raw))


# --------------------------------------------------------------------------------------------- writer


class Registry:
    """Writes the registry. All public methods are safe to call concurrently from several daemons.

    Args:
        client: a redis-py client (bytes or ``decode_responses=True``); the caller owns and closes it.
        keys: key names under the configured namespace.
        clock: wall-clock seconds used for timestamps and heartbeat expiry (injectable for tests).
    """

    def __init__(self, client: redis.Redis, keys: Keys, clock: Clock = time.time) -> None:
        self._r = client
        self._keys = keys
        self._clock = clock
        self._snapshot_script = client.register_script(_SNAPSHOT_LUA)
        self._release_script = client.register_script(_RELEASE_LUA)
        self._refresh_script = client.register_script(_REFRESH_LUA)
        self._prune_script = client.register_script(_PRUNE_LUA)

    @property
    def keys(self) -> Keys:
        return self._keys

    # -- helpers (run inside a WATCHed pipeline, before MULTI)

    def _txn(self, fn: Callable[[redis.client.Pipeline], T], *watch: str) -> T:
        """Run ``fn`` as an optimistic transaction (retried while a WATCHed key changes under it)."""
        result: Any = self._r.transaction(fn, *watch, value_from_callable=True)  # type: ignore[arg-type]
        return cast(T, result)

    def _load(self, pipe: redis.client.Pipeline, cid: str) -> CompartmentRecord | None:
        raw = pipe.hgetall(self._keys.compartment(cid))
        return CompartmentRecord.from_hash(cid, raw) if raw else None

    def _epoch(self, pipe: redis.client.Pipeline | redis.Redis) -> int:
        value = pipe.get(self._keys.epoch)
        return int(_text(value)) if value is not None else 0

    def _field(self, pipe: redis.client.Pipeline, key: str, name: str) -> str | None:
        value = pipe.hget(key, name)
        return _text(value) if value is not None else None

    def _announce(
        self,
        pipe: redis.client.Pipeline,
        epoch: int,
        kind: str,
        *,
        compartment_id: str | None = None,
        source: str | None = None,
        detail: Mapping[str, Any] | None = None,
    ) -> None:
        """Queue the change-log entry and the event (inside MULTI)."""
        now = self._clock()
        pipe.xadd(
            self._keys.changes,
            {
                "epoch": str(epoch),
                "kind": kind,
                "compartment_id": compartment_id or "",
                "source": source or "",
                "at": repr(now),
                "detail": json.dumps(dict(detail or {}), sort_keys=True),
            },
            maxlen=CHANGES_MAXLEN,
            approximate=True,
        )
        pipe.publish(
            self._keys.events,
            json.dumps({"epoch": epoch, "kind": kind, "compartment_id": compartment_id, "source": source}),
        )

    def _queue_retire(self, pipe: redis.client.Pipeline, record: CompartmentRecord, reason: str, now: float) -> None:
        """Queue the writes that retire ``record`` (inside MULTI); the caller handles the epoch."""
        pipe.hset(
            self._keys.compartment(record.compartment_id),
            mapping=_fields(
                {"status": CompartmentStatus.RETIRED.value, "retired_reason": reason, "updated_at": repr(now)}
            ),
        )
        pipe.srem(self._keys.active, record.compartment_id)

    # -- lifecycle

    def begin_training(self, source: str, fingerprint: str, lineage: Mapping[str, Any]) -> CompartmentRecord:
        """Register a new version of ``source`` in status training (idempotent per fingerprint).

        Args:
            source: source name (see ``keys.SOURCE_NAME_PATTERN``).
            fingerprint: ``cdm.data.fingerprint`` of the complete data the compartment will be trained on.
            lineage: JSON-able description of where the data came from (topic, partitions, offsets, chunks).

        Returns the existing record when a training or active compartment already has this fingerprint
        (so a redelivered source is not trained twice: check ``status``). Otherwise creates version n+1;
        an unfinished training compartment of the same source with other data is retired as superseded.
        The composition does not change, so the epoch does not either.
        """
        check_source(source)
        if not fingerprint:
            raise ValueError("fingerprint must be a non-empty string")
        lineage_doc = json.loads(json.dumps(dict(lineage)))  # JSON-able now, not at read time
        sk, fk = self._keys.source(source), self._keys.fingerprints(source)

        def fn(pipe: redis.client.Pipeline) -> CompartmentRecord:
            existing = self._field(pipe, fk, fingerprint)
            if existing is not None:
                pipe.watch(self._keys.compartment(existing))
                record = self._load(pipe, existing)
                if record is not None and record.status is not CompartmentStatus.RETIRED:
                    pipe.multi()  # nothing to write; EXEC still verifies the WATCHed keys
                    return record
            previous_training = self._field(pipe, sk, "training")
            stale: CompartmentRecord | None = None
            if previous_training is not None:
                pipe.watch(self._keys.compartment(previous_training))
                stale = self._load(pipe, previous_training)
            version = int(self._field(pipe, sk, "version") or 0) + 1
            epoch = self._epoch(pipe)
            now = self._clock()
            cid = compartment_id(source, version)
            record = CompartmentRecord(
                compartment_id=cid,
                source=source,
                version=version,
                status=CompartmentStatus.TRAINING,
                fingerprint=fingerprint,
                lineage=lineage_doc,
                created_at=now,
                updated_at=now,
            )
            pipe.multi()
            pipe.hset(self._keys.compartment(cid), mapping=_fields(record.to_hash()))
            pipe.hset(sk, mapping=_fields({"version": str(version), "training": cid}))
            pipe.hset(fk, fingerprint, cid)
            pipe.sadd(self._keys.sources, source)
            if stale is not None and stale.status is CompartmentStatus.TRAINING:
                self._queue_retire(pipe, stale, f"superseded by {cid}", now)
            self._announce(
                pipe,
                epoch,
                "training",
                compartment_id=cid,
                source=source,
                detail={"superseded": stale.compartment_id if stale else None},
            )
            return record

        return self._txn(fn, sk, fk, self._keys.epoch)

    def activate(
        self,
        compartment_id: str,
        *,
        artifact_uri: str,
        sha256: Mapping[str, str],
        prior: float,
        class_counts: Sequence[int],
        n_samples: int,
        train_metrics: Mapping[str, Any],
    ) -> CompartmentRecord:
        """Make a trained compartment active, in one transaction with everything it implies.

        Sets status active and the artifact fields, adds it to the active set, retires the previously
        active version of the same source, bumps the epoch once, appends to the change log and publishes.

        Args:
            compartment_id: the id returned by ``begin_training``.
            artifact_uri: where the saved compartment is (a directory path or URI).
            sha256: artifact file name -> sha256 hex, as in the compartment's manifest.
            prior: the compartment's prior weight in the composition.
            class_counts: samples per class in its data.
            n_samples: number of training samples.
            train_metrics: JSON-able training summary (final_loss, steps, seconds, ...).

        Returns the record. Activating an already active compartment is a no-op. If a *newer* version of
        the source is already active, this one is retired as superseded instead (``status`` says so).
        Raises CompartmentNotFound, or InvalidTransition if it was retired (forgotten, superseded).
        """
        source, version = parse_compartment_id(compartment_id)
        if n_samples < 0 or any(c < 0 for c in class_counts):
            raise ValueError(f"n_samples {n_samples} and class_counts {list(class_counts)} must be >= 0")
        ck, sk = self._keys.compartment(compartment_id), self._keys.source(source)
        fields = {
            "artifact_uri": artifact_uri,
            "sha256": json.dumps(dict(sha256), sort_keys=True),
            "prior": repr(float(prior)),
            "class_counts": json.dumps([int(c) for c in class_counts]),
            "n_samples": str(int(n_samples)),
            "train_metrics": json.dumps(dict(train_metrics), sort_keys=True),
        }

        def fn(pipe: redis.client.Pipeline) -> CompartmentRecord:
            record = self._load(pipe, compartment_id)
            if record is None:
                raise CompartmentNotFound(f"no compartment {compartment_id!r} in the registry")
            if record.status is CompartmentStatus.ACTIVE:
                pipe.multi()
                return record
            if record.status is CompartmentStatus.RETIRED:
                raise InvalidTransition(
                    f"compartment {compartment_id!r} is retired ({record.retired_reason}); it cannot be activated"
                )
            current = self._field(pipe, sk, "current")
            training = self._field(pipe, sk, "training")
            previous: CompartmentRecord | None = None
            if current is not None and current != compartment_id:
                pipe.watch(self._keys.compartment(current))
                previous = self._load(pipe, current)
            epoch = self._epoch(pipe)
            now = self._clock()
            pipe.multi()
            pipe.hset(ck, mapping=_fields(fields))
            if training == compartment_id:
                pipe.hdel(sk, "training")
            if previous is not None and previous.version > version:
                reason = f"superseded by {previous.compartment_id}"
                self._queue_retire(pipe, record, reason, now)
                self._announce(
                    pipe, epoch, "retired", compartment_id=compartment_id, source=source, detail={"reason": reason}
                )
                return _replace(record, fields, status=CompartmentStatus.RETIRED, retired_reason=reason, now=now)
            pipe.hset(ck, mapping=_fields({"status": CompartmentStatus.ACTIVE.value, "updated_at": repr(now)}))
            pipe.sadd(self._keys.active, compartment_id)
            if previous is not None and previous.status is not CompartmentStatus.RETIRED:
                self._queue_retire(pipe, previous, f"replaced by {compartment_id}", now)
            pipe.hset(sk, "current", compartment_id)
            pipe.set(self._keys.epoch, epoch + 1)
            self._announce(
                pipe,
                epoch + 1,
                "activated",
                compartment_id=compartment_id,
                source=source,
                detail={"replaced": previous.compartment_id if previous else None},
            )
            return _replace(record, fields, status=CompartmentStatus.ACTIVE, now=now)

        return self._txn(fn, ck, sk, self._keys.epoch)

    def retire(self, compartment_id: str, reason: str) -> CompartmentRecord:
        """Retire a training or active compartment (no-op if already retired).

        Removing an active compartment changes the composition, so the epoch is bumped once.
        Raises CompartmentNotFound.
        """
        source, _ = parse_compartment_id(compartment_id)
        ck, sk = self._keys.compartment(compartment_id), self._keys.source(source)

        def fn(pipe: redis.client.Pipeline) -> CompartmentRecord:
            record = self._load(pipe, compartment_id)
            if record is None:
                raise CompartmentNotFound(f"no compartment {compartment_id!r} in the registry")
            if record.status is CompartmentStatus.RETIRED:
                pipe.multi()
                return record
            current, training = self._field(pipe, sk, "current"), self._field(pipe, sk, "training")
            epoch = self._epoch(pipe)
            now = self._clock()
            was_active = record.status is CompartmentStatus.ACTIVE
            pipe.multi()
            self._queue_retire(pipe, record, reason, now)
            if current == compartment_id:
                pipe.hdel(sk, "current")
            if training == compartment_id:
                pipe.hdel(sk, "training")
            if was_active:
                epoch += 1
                pipe.set(self._keys.epoch, epoch)
            detail = {"reason": reason, "was_active": was_active}
            self._announce(pipe, epoch, "retired", compartment_id=compartment_id, source=source, detail=detail)
            pipe.lpush(self._keys.audit, _audit("retire", now, compartment_id=compartment_id, reason=reason))
            pipe.ltrim(self._keys.audit, 0, AUDIT_MAXLEN - 1)
            return _replace(record, {}, status=CompartmentStatus.RETIRED, retired_reason=reason, now=now)

        return self._txn(fn, ck, sk, self._keys.epoch)

    def forget_source(self, source: str, reason: str = "forget requested") -> ForgetReceipt:
        """Remove every compartment of ``source`` from the composition and record a receipt.

        Retires its active and training compartments, clears its index and fingerprints (so the same
        data sent again is trained afresh), bumps the epoch once if the composition changed, and appends
        the receipt to the audit list. Deleting artifact files is the garbage collector's job.
        Idempotent: forgetting an unknown or already forgotten source returns a receipt with no ids.
        """
        check_source(source)
        sk, fk = self._keys.source(source), self._keys.fingerprints(source)

        def fn(pipe: redis.client.Pipeline) -> ForgetReceipt:
            version = int(self._field(pipe, sk, "version") or 0)
            cids = [compartment_id(source, v) for v in range(1, version + 1)]
            if cids:
                pipe.watch(*(self._keys.compartment(c) for c in cids))
            records = [r for r in (self._load(pipe, c) for c in cids) if r is not None]
            live = [r for r in records if r.status is not CompartmentStatus.RETIRED]
            epoch = self._epoch(pipe)
            now = self._clock()
            why = f"forgotten: {reason}"
            pipe.multi()
            for record in live:
                self._queue_retire(pipe, record, why, now)
            pipe.hdel(sk, "current", "training")
            pipe.delete(fk)
            if any(r.status is CompartmentStatus.ACTIVE for r in live):
                epoch += 1
                pipe.set(self._keys.epoch, epoch)
            receipt = ForgetReceipt(
                receipt_id=uuid.uuid4().hex,
                source=source,
                compartment_ids=tuple(r.compartment_id for r in live),
                epoch=epoch,
                reason=reason,
                created_at=now,
            )
            pipe.hset(self._keys.forget_receipts, receipt.receipt_id, receipt.to_json())
            pipe.lpush(self._keys.audit, _audit("forget", now, receipt=json.loads(receipt.to_json())))
            pipe.ltrim(self._keys.audit, 0, AUDIT_MAXLEN - 1)
            detail = {"receipt_id": receipt.receipt_id, "compartment_ids": list(receipt.compartment_ids)}
            self._announce(pipe, epoch, "forgotten", source=source, detail=detail)
            return receipt

        return self._txn(fn, sk, fk, self._keys.epoch)

    def set_router(self, router: RouterRecord) -> int:
        """Install ``router`` as the active router (replacing any); returns the new epoch."""

        def fn(pipe: redis.client.Pipeline) -> int:
            epoch = self._epoch(pipe) + 1
            pipe.multi()
            pipe.delete(self._keys.router)
            pipe.hset(self._keys.router, mapping=_fields(router.to_hash()))
            pipe.set(self._keys.epoch, epoch)
            self._announce(pipe, epoch, "router", detail={"router_id": router.router_id})
            return epoch

        return self._txn(fn, self._keys.epoch)

    def clear_router(self) -> int | None:
        """Remove the active router (e.g. no compartment is left); returns the new epoch, None if none was set."""

        def fn(pipe: redis.client.Pipeline) -> int | None:
            if not pipe.exists(self._keys.router):
                pipe.multi()
                return None
            epoch = self._epoch(pipe) + 1
            pipe.multi()
            pipe.delete(self._keys.router)
            pipe.set(self._keys.epoch, epoch)
            self._announce(pipe, epoch, "router", detail={"router_id": None})
            return epoch

        return self._txn(fn, self._keys.router, self._keys.epoch)

    def record_audit(self, kind: str, doc: Mapping[str, Any]) -> None:
        """Append ``{**doc, "kind": kind, "at": now}`` (JSON-able) to the audit list (``kind`` wins over doc's)."""
        entry = json.dumps({**dict(doc), "kind": kind, "at": self._clock()}, sort_keys=True)
        with self._r.pipeline(transaction=True) as pipe:
            pipe.lpush(self._keys.audit, entry)
            pipe.ltrim(self._keys.audit, 0, AUDIT_MAXLEN - 1)
            pipe.execute()

    # -- reads

    def snapshot(self) -> RegistrySnapshot:
        """Epoch, active compartments and router, read atomically (one Lua script)."""
        return _read_snapshot(self._snapshot_script, self._keys)

    def epoch(self) -> int:
        return self._epoch(self._r)

    def get(self, compartment_id: str) -> CompartmentRecord:
        """One compartment (any status); CompartmentNotFound if unknown."""
        raw = self._r.hgetall(self._keys.compartment(compartment_id))
        if not raw:
            raise CompartmentNotFound(f"no compartment {compartment_id!r} in the registry")
        return CompartmentRecord.from_hash(compartment_id, raw)

    def history(self, source: str) -> list[CompartmentRecord]:
        """Every version of ``source``, oldest first."""
        version = self._r.hget(self._keys.source(source), "version")
        cids = [compartment_id(source, v) for v in range(1, int(_text(version)) + 1)] if version else []
        with self._r.pipeline(transaction=False) as pipe:
            for cid in cids:
                pipe.hgetall(self._keys.compartment(cid))
            raws = pipe.execute()
        return [CompartmentRecord.from_hash(c, raw) for c, raw in zip(cids, raws, strict=True) if raw]

    def sources(self) -> list[str]:
        """Every source ever registered, sorted."""
        return sorted(_text(s) for s in self._r.smembers(self._keys.sources))

    def compartment_for_fingerprint(self, source: str, fingerprint: str) -> CompartmentRecord | None:
        """The compartment (any status) trained or training on exactly this data of ``source``, if any."""
        cid = self._r.hget(self._keys.fingerprints(source), fingerprint)
        if cid is None:
            return None
        raw = self._r.hgetall(self._keys.compartment(_text(cid)))
        return CompartmentRecord.from_hash(_text(cid), raw) if raw else None

    def changes(self, since_id: str = "0", count: int = 1000) -> list[ChangeEvent]:
        """Change-log entries after stream id ``since_id`` ("0": from the start), oldest first."""
        start = "-" if since_id in ("0", "0-0", "-") else f"({since_id}"
        entries = self._r.xrange(self._keys.changes, min=start, max="+", count=count) or []
        return [_change_event(stream_id, fields) for stream_id, fields in entries]

    def forget_receipt(self, receipt_id: str) -> ForgetReceipt | None:
        raw = self._r.hget(self._keys.forget_receipts, receipt_id)
        return ForgetReceipt.from_json(raw) if raw is not None else None

    def audit(self, limit: int = 100) -> list[dict[str, Any]]:
        """The newest ``limit`` audit entries, newest first."""
        return [json.loads(x) for x in self._r.lrange(self._keys.audit, 0, limit - 1)]

    # -- locks (SET NX PX; release / refresh only by the owner, atomically in Lua)

    def acquire_source_lock(self, source: str, owner: str, ttl_s: float) -> bool:
        """Take the training lock of ``source`` for ``ttl_s`` seconds; False if another owner holds it."""
        return self._acquire(self._keys.source_lock(source), owner, ttl_s)

    def release_source_lock(self, source: str, owner: str) -> bool:
        """Release it if ``owner`` holds it; False if it expired or belongs to someone else."""
        return bool(self._release_script(keys=[self._keys.source_lock(source)], args=[owner]))

    def refresh_source_lock(self, source: str, owner: str, ttl_s: float) -> bool:
        """Extend it to ``ttl_s`` from now if ``owner`` still holds it; False means the lock was lost."""
        return self._refresh(self._keys.source_lock(source), owner, ttl_s)

    def source_lock_owner(self, source: str) -> str | None:
        value = self._r.get(self._keys.source_lock(source))
        return _text(value) if value is not None else None

    def acquire_job_lock(self, name: str, owner: str, ttl_s: float) -> bool:
        """Singleton lock for a cluster-wide job (e.g. "router", "gc")."""
        return self._acquire(self._keys.job_lock(name), owner, ttl_s)

    def release_job_lock(self, name: str, owner: str) -> bool:
        return bool(self._release_script(keys=[self._keys.job_lock(name)], args=[owner]))

    def refresh_job_lock(self, name: str, owner: str, ttl_s: float) -> bool:
        return self._refresh(self._keys.job_lock(name), owner, ttl_s)

    def _acquire(self, key: str, owner: str, ttl_s: float) -> bool:
        if not owner:
            raise ValueError("lock owner must be a non-empty string")
        return bool(self._r.set(key, owner, nx=True, px=_ms(ttl_s)))

    def _refresh(self, key: str, owner: str, ttl_s: float) -> bool:
        return bool(self._refresh_script(keys=[key], args=[owner, _ms(ttl_s)]))

    # -- daemon liveness

    def heartbeat(self, daemon_id: str, ttl_s: float, info: Mapping[str, Any]) -> None:
        """Announce that ``daemon_id`` is alive for ``ttl_s`` seconds, with ``info`` (JSON-able).

        Liveness is the key's Redis TTL alone (no daemon's clock is trusted); the index only lists ids.
        """
        with self._r.pipeline(transaction=True) as pipe:
            pipe.set(self._keys.daemon(daemon_id), json.dumps(dict(info), sort_keys=True), px=_ms(ttl_s))
            pipe.zadd(self._keys.daemons, {daemon_id: self._clock()})
            pipe.execute()

    def clear_heartbeat(self, daemon_id: str) -> None:
        """Remove the heartbeat at clean shutdown (others see the daemon gone at once)."""
        with self._r.pipeline(transaction=True) as pipe:
            pipe.delete(self._keys.daemon(daemon_id))
            pipe.zrem(self._keys.daemons, daemon_id)
            pipe.execute()

    def live_daemons(self) -> list[DaemonInfo]:
        """Daemons whose heartbeat key has not expired, sorted by id (expired ones leave the index)."""
        ids = sorted(_text(d) for d in self._r.zrange(self._keys.daemons, 0, -1))
        if not ids:
            return []
        with self._r.pipeline(transaction=False) as pipe:
            for d in ids:
                pipe.get(self._keys.daemon(d))
                pipe.pttl(self._keys.daemon(d))
            replies = pipe.execute()
        live, dead = [], []
        for i, d in enumerate(ids):
            raw, pttl = replies[2 * i], replies[2 * i + 1]
            if raw is not None and pttl is not None and int(pttl) > 0:
                live.append(DaemonInfo(daemon_id=d, info=json.loads(raw), ttl_s=int(pttl) / 1000))
            else:
                dead.append(d)
        for d in dead:  # a heartbeat may land between the read and here: remove only if still absent
            self._prune_script(keys=[self._keys.daemons, self._keys.daemon(d)], args=[d])
        return live


def _fields(mapping: Mapping[str, str]) -> Mapping[Any, Any]:
    """A str -> str hash for redis-py's HSET ``mapping=`` (whose key type is invariant)."""
    return mapping


def _ms(seconds: float) -> int:
    if seconds <= 0:
        raise ValueError(f"ttl {seconds} s must be > 0")
    return max(1, int(seconds * 1000))


def _audit(kind: str, at: float, **fields: Any) -> str:
    return json.dumps({"kind": kind, "at": at, **fields}, sort_keys=True)


def _replace(
    record: CompartmentRecord,
    fields: Mapping[str, str],
    *,
    status: CompartmentStatus,
    now: float,
    retired_reason: str | None = None,
) -> CompartmentRecord:
    """``record`` with the hash ``fields`` just written applied (what a fresh read would return)."""
    h = record.to_hash()
    h.update(fields)
    h["status"] = status.value
    h["updated_at"] = repr(now)
    if retired_reason is not None:
        h["retired_reason"] = retired_reason
    return CompartmentRecord.from_hash(record.compartment_id, h)


def _change_event(stream_id: Any, raw: Any) -> ChangeEvent:
    h = _decode_hash(raw)
    return ChangeEvent(
        stream_id=_text(stream_id),
        epoch=int(h["epoch"]),
        kind=h["kind"],
        compartment_id=h.get("compartment_id") or None,
        source=h.get("source") or None,
        at=float(h.get("at") or 0.0),
        detail=json.loads(h.get("detail") or "{}"),
    )


# --------------------------------------------------------------------------------------------- reader


class _ReconnectAwarePubSub(redis.client.PubSub):
    """PubSub that counts reconnections: redis-py re-subscribes silently, losing what was published."""

    reconnects = 0

    def on_connect(self, connection: Any) -> None:
        self.reconnects += 1
        super().on_connect(connection)


class RegistryClient:
    """Read side for samplers: consistent snapshots and a watch that never misses the latest epoch.

    Args:
        client: a redis-py client; the caller owns and closes it.
        keys: key names under the configured namespace.
    """

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self._r = client
        self._keys = keys
        self._snapshot_script = client.register_script(_SNAPSHOT_LUA)

    def snapshot(self) -> RegistrySnapshot:
        """Epoch, active compartments and router, read atomically."""
        return _read_snapshot(self._snapshot_script, self._keys)

    def epoch(self) -> int:
        value = self._r.get(self._keys.epoch)
        return int(_text(value)) if value is not None else 0

    def iter_snapshots(
        self,
        stop_event: threading.Event,
        *,
        resync_s: float = 5.0,
        poll_s: float = 0.5,
        retry_s: float = 1.0,
    ) -> Iterator[RegistrySnapshot]:
        """Yield a snapshot now and then whenever the epoch differs from the last one yielded.

        Pub/sub events are only a hint (they are lost while disconnected or before subscribing), so the
        epoch is also re-read (1) right after every (re)subscription, (2) after redis-py silently
        reconnected, and (3) every ``resync_s`` seconds. Changes that happen between two reads are
        coalesced: the newest composition is yielded, never a stale one. Epochs normally increase; a
        smaller one means the registry was reset and is yielded too. Stops when ``stop_event`` is set
        (checked at least every ``poll_s`` seconds). Connection errors are logged and retried every
        ``retry_s`` seconds.
        """
        last: int | None = None
        while not stop_event.is_set():
            pubsub = _ReconnectAwarePubSub(self._r.connection_pool, ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(self._keys.events)
                reconnects = pubsub.reconnects
                check = True  # subscribed just now: anything published before is lost, so re-read
                next_resync = time.monotonic() + resync_s
                while not stop_event.is_set():
                    if check or pubsub.reconnects != reconnects or time.monotonic() >= next_resync:
                        reconnects, check = pubsub.reconnects, False
                        next_resync = time.monotonic() + resync_s
                        if self.epoch() != last:
                            snap = self.snapshot()
                            if snap.epoch != last:
                                last = snap.epoch
                                yield snap
                    wait = max(0.0, min(poll_s, next_resync - time.monotonic()))
                    message = pubsub.get_message(timeout=wait)
                    if message is not None and message.get("type") == "message":
                        check = True
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                log.warning("registry watch: %s; retrying in %.1fs", exc, retry_s)
                stop_event.wait(retry_s)
            finally:
                pubsub.close()

    def watch(
        self,
        callback: Callable[[RegistrySnapshot], None],
        stop_event: threading.Event,
        *,
        resync_s: float = 5.0,
        poll_s: float = 0.5,
        retry_s: float = 1.0,
    ) -> None:
        """Call ``callback(snapshot)`` for the current composition and every later epoch change.

        Blocks until ``stop_event`` is set; run it in a thread. See ``iter_snapshots`` for the guarantees.
        """
        for snap in self.iter_snapshots(stop_event, resync_s=resync_s, poll_s=poll_s, retry_s=retry_s):
            callback(snap)
