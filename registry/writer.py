"""The registry's writer: the compartment lifecycle, the router, the routing kind and the audit log, as atomic
transactions.

Every change that touches several keys is one MULTI/EXEC transaction; read-modify-write changes WATCH what
they read (and the epoch) and are retried by ``redis.Redis.transaction`` when another writer got there
first. The invariant readers rely on: **``epoch`` is incremented exactly once by every transaction that
changes the composition** (the active set, an active compartment's record, the router or the routing kind), in
the same transaction, together with a change-log entry (``XADD``) and an event (``PUBLISH``). So a reader holding
a snapshot taken atomically with its epoch knows the composition is unchanged as long as the epoch is.

Lifecycle of a compartment (one version of one source)::

    begin_training ──> training ──activate──> active ──(newer version activated | retire | forget)──> retired
                          └──────────(retire | forget | newer training begun)────────────────────────────┘

``Registry`` extends the read side (``registry.reader.RegistryClient``) with these writes. Records and their
codec are in ``registry/records.py``, key names in ``registry/keys.py``, locks and heartbeats in
``registry/coordination.py``.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar, cast

import redis
import redis.client

from registry.errors import CompartmentNotFound, InvalidTransition
from registry.keys import AUDIT_MAXLEN, CHANGES_MAXLEN, Keys, check_source, compartment_id, parse_compartment_id
from registry.reader import RegistryClient
from registry.records import (
    ChangeEvent,
    CompartmentRecord,
    CompartmentStatus,
    RouterRecord,
    RoutingKind,
    StoredFile,
    Tombstone,
    from_hash,
    routing_kind,
    text,
    to_hash,
)

T = TypeVar("T")
Clock = Callable[[], float]


class Registry(RegistryClient):
    """Writes the registry (and reads it, as ``RegistryClient``). Safe to call concurrently from several daemons.

    Args:
        client: a redis-py client (bytes or ``decode_responses=True``); the caller owns and closes it.
        keys: key names under the configured namespace.
        clock: wall-clock seconds used for timestamps (injectable for tests).
    """

    def __init__(self, client: redis.Redis, keys: Keys, clock: Clock = time.time) -> None:
        super().__init__(client, keys)
        self._clock = clock

    # -- helpers (run inside a WATCHed pipeline, before MULTI)

    def _txn(self, fn: Callable[[redis.client.Pipeline], T], *watch: str) -> T:
        """Run ``fn`` as an optimistic transaction (retried while a WATCHed key changes under it)."""
        result: Any = self._r.transaction(fn, *watch, value_from_callable=True)  # type: ignore[arg-type]
        return cast(T, result)

    def _load(self, pipe: redis.client.Pipeline, cid: str) -> CompartmentRecord | None:
        raw = pipe.hgetall(self._keys.compartment(cid))
        return from_hash(CompartmentRecord, raw, compartment_id=cid) if raw else None

    def _epoch(self, pipe: redis.client.Pipeline) -> int:
        value = pipe.get(self._keys.epoch)
        return int(text(value)) if value is not None else 0

    def _field(self, pipe: redis.client.Pipeline, key: str, name: str) -> str | None:
        value = pipe.hget(key, name)
        return text(value) if value is not None else None

    def _write(self, pipe: redis.client.Pipeline, record: CompartmentRecord) -> CompartmentRecord:
        """Queue the whole record (inside MULTI; its key is WATCHed by the caller) and return it."""
        pipe.hset(self._keys.compartment(record.compartment_id), mapping=_mapping(to_hash(record)))
        return record

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
        event = ChangeEvent(
            stream_id="",  # assigned by XADD
            epoch=epoch,
            kind=kind,
            compartment_id=compartment_id,
            source=source,
            at=self._clock(),
            detail=dict(detail or {}),
        )
        pipe.xadd(self._keys.changes, _mapping(to_hash(event)), maxlen=CHANGES_MAXLEN, approximate=True)
        pipe.publish(
            self._keys.events,
            json.dumps({"epoch": epoch, "kind": kind, "compartment_id": compartment_id, "source": source}),
        )

    def _queue_retire(
        self, pipe: redis.client.Pipeline, record: CompartmentRecord, reason: str, now: float
    ) -> CompartmentRecord:
        """Queue the writes that retire ``record`` (inside MULTI); returns it retired. The caller bumps the epoch."""
        retired = dataclasses.replace(record, status=CompartmentStatus.RETIRED, retired_reason=reason, updated_at=now)
        self._write(pipe, retired)
        pipe.srem(self._keys.active, record.compartment_id)
        return retired

    # -- lifecycle

    def begin_training(self, source: str, fingerprint: str, lineage: Mapping[str, Any]) -> CompartmentRecord:
        """Register a new version of ``source`` in status training (idempotent per fingerprint).

        Args:
            source: source name (``common.names``: the one source-name rule).
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
            self._write(pipe, record)
            pipe.hset(sk, mapping=_mapping({"version": str(version), "training": cid}))
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
        sha256: Mapping[str, str] | None = None,
        prior: float,
        class_counts: Sequence[int],
        n_samples: int,
        train_metrics: Mapping[str, Any],
        files: Mapping[str, StoredFile] | None = None,
    ) -> CompartmentRecord:
        """Make a trained compartment active, in one transaction with everything it implies.

        Sets status active and the artifact fields, adds it to the active set, retires the previously
        active version of the same source, bumps the epoch once, appends to the change log and publishes.

        Args:
            compartment_id: the id returned by ``begin_training``.
            artifact_uri: the artifact's prefix URI in the artifact store.
            sha256: artifact file name -> sha256 hex (default: derived from ``files``).
            prior: the compartment's prior weight in the composition.
            class_counts: samples per class in its data.
            n_samples: number of training samples.
            train_metrics: JSON-able training summary (final_loss, steps, seconds, ...).
            files: relative path -> the uploaded file (uri, sha256, size), as ``cdm.artifacts.upload_directory``
                made it.

        Returns the record. Activating an already active compartment is a no-op. If a *newer* version of
        the source is already active, this one is retired as superseded instead (``status`` says so).
        Raises CompartmentNotFound, or InvalidTransition if it was retired (forgotten, superseded).
        """
        source, version = parse_compartment_id(compartment_id)
        if n_samples < 0 or any(c < 0 for c in class_counts):
            raise ValueError(f"n_samples {n_samples} and class_counts {list(class_counts)} must be >= 0")
        ck, sk = self._keys.compartment(compartment_id), self._keys.source(source)
        stored = {rel: StoredFile(str(f.uri), str(f.sha256), int(f.size)) for rel, f in (files or {}).items()}
        artifact = {
            "artifact_uri": artifact_uri,
            "sha256": dict(sha256) if sha256 is not None else {rel: f.sha256 for rel, f in stored.items()},
            "files": stored,
            "prior": float(prior),
            "class_counts": tuple(int(c) for c in class_counts),
            "n_samples": int(n_samples),
            "train_metrics": json.loads(json.dumps(dict(train_metrics))),  # JSON-able now, not inside MULTI
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
            trained = dataclasses.replace(record, **artifact)
            pipe.multi()
            if training == compartment_id:
                pipe.hdel(sk, "training")
            if previous is not None and previous.version > version:
                reason = f"superseded by {previous.compartment_id}"
                retired = self._queue_retire(pipe, trained, reason, now)
                self._announce(
                    pipe, epoch, "retired", compartment_id=compartment_id, source=source, detail={"reason": reason}
                )
                return retired
            active = self._write(pipe, dataclasses.replace(trained, status=CompartmentStatus.ACTIVE, updated_at=now))
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
            return active

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
            retired = self._queue_retire(pipe, record, reason, now)
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
            return retired

        return self._txn(fn, ck, sk, self._keys.epoch)

    def forget_source(
        self,
        source: str,
        reason: str = "",
        *,
        request_id: str = "",
        through: Mapping[str, int] | None = None,
        files_sha256: Sequence[str] = (),
    ) -> Tombstone:
        """Remove every compartment of ``source`` from the composition and write its tombstone, atomically.

        Retires its active and training compartments, scrubs the fingerprint and lineage of every version (only
        the ids and what a receipt needs stay), clears its index and fingerprints (so the same data sent again
        after the forget is a new source), writes ``ns:tombstone:{source}``, bumps the epoch once if the
        composition changed, and appends an audit entry. Deleting artifacts is the caller's (``cdm.lifecycle``).

        Args:
            source: the source to forget.
            reason: why (audit and ``retired_reason``).
            request_id: the forget request; calling again with the same id returns the same tombstone unchanged
                ("" = a new one-off request).
            through: "topic:partition" -> the last offset of the source's records known to the caller.
            files_sha256: sha256 of every artifact file being forgotten (readers purge them from caches).
        """
        check_source(source)
        request_id = request_id or f"registry-{uuid.uuid4().hex}"
        sk, fk, tk = self._keys.source(source), self._keys.fingerprints(source), self._keys.tombstone(source)
        through_doc = {str(k): int(v) for k, v in (through or {}).items()}

        def fn(pipe: redis.client.Pipeline) -> Tombstone:
            raw = pipe.hgetall(tk)
            if raw:
                existing = from_hash(Tombstone, raw, source=source)
                if existing.request_id == request_id:
                    pipe.multi()
                    return existing
            version = int(self._field(pipe, sk, "version") or 0)
            cids = [compartment_id(source, v) for v in range(1, version + 1)]
            if cids:
                pipe.watch(*(self._keys.compartment(c) for c in cids))
            records = [r for r in (self._load(pipe, c) for c in cids) if r is not None]
            live = [r for r in records if r.status is not CompartmentStatus.RETIRED]
            epoch = self._epoch(pipe)
            now = self._clock()
            why = f"forgotten: {reason or request_id}"
            pipe.multi()
            for record in records:
                scrubbed = dataclasses.replace(record, fingerprint="", lineage={})
                if record in live:
                    self._queue_retire(pipe, scrubbed, why, now)
                else:
                    pipe.hdel(self._keys.compartment(record.compartment_id), "fingerprint", "lineage")
            pipe.hdel(sk, "current", "training")
            pipe.delete(fk)
            if any(r.status is CompartmentStatus.ACTIVE for r in live):
                epoch += 1
                pipe.set(self._keys.epoch, epoch)
            tomb = Tombstone(
                source=source,
                forgotten_at=now,
                epoch=epoch,
                request_id=request_id,
                through=through_doc,
                files_sha256=tuple(sorted(set(files_sha256))),
                compartment_ids=tuple(r.compartment_id for r in live),
            )
            pipe.delete(tk)
            pipe.hset(tk, mapping=_mapping(to_hash(tomb)))
            retired = list(tomb.compartment_ids)
            entry = _audit("forget", now, source=source, request_id=request_id, reason=reason, retired=retired)
            pipe.lpush(self._keys.audit, entry)
            pipe.ltrim(self._keys.audit, 0, AUDIT_MAXLEN - 1)
            detail = {"request_id": request_id, "compartment_ids": list(tomb.compartment_ids)}
            self._announce(pipe, epoch, "forgotten", source=source, detail=detail)
            return tomb

        return self._txn(fn, sk, fk, tk, self._keys.epoch)

    def scrub(self, compartment_id: str) -> CompartmentRecord:
        """Clear the fingerprint and lineage of a retired compartment (its data was partly forgotten) and drop its
        fingerprint from the source's index. Only retired records can be scrubbed (InvalidTransition otherwise)."""
        source, _ = parse_compartment_id(compartment_id)
        ck, fk = self._keys.compartment(compartment_id), self._keys.fingerprints(source)

        def fn(pipe: redis.client.Pipeline) -> CompartmentRecord:
            record = self._load(pipe, compartment_id)
            if record is None:
                raise CompartmentNotFound(f"no compartment {compartment_id!r} in the registry")
            if record.status is not CompartmentStatus.RETIRED:
                raise InvalidTransition(
                    f"compartment {compartment_id!r} is {record.status}; only retired compartments are scrubbed"
                )
            mapped = self._field(pipe, fk, record.fingerprint) if record.fingerprint else None
            pipe.multi()
            if mapped == compartment_id:
                pipe.hdel(fk, record.fingerprint)
            pipe.hdel(ck, "fingerprint", "lineage")
            return dataclasses.replace(record, fingerprint="", lineage={})

        return self._txn(fn, ck, fk)

    # -- forget requests: the journal (plan in progress) and the one receipt per request

    def save_journal(self, request_id: str, doc: Mapping[str, Any]) -> None:
        """Store the JSON plan of forget request ``request_id`` (replacing the previous state)."""
        self._r.hset(self._keys.forget_journal, _request_id(request_id), json.dumps(dict(doc), sort_keys=True))

    def put_receipt(self, request_id: str, doc: Mapping[str, Any]) -> bool:
        """Write the receipt of ``request_id`` once (and its audit entry ``forget-complete``); False if one exists.

        The first write wins, so a request completed twice (a redelivery racing a rerun) keeps one receipt.
        """
        entry = json.dumps(dict(doc), sort_keys=True)

        def fn(pipe: redis.client.Pipeline) -> bool:
            if pipe.hexists(self._keys.forget_receipts, _request_id(request_id)):
                pipe.multi()
                return False
            pipe.multi()
            pipe.hset(self._keys.forget_receipts, request_id, entry)
            pipe.lpush(self._keys.audit, json.dumps({**dict(doc), "kind": "forget-complete", "at": self._clock()}))
            pipe.ltrim(self._keys.audit, 0, AUDIT_MAXLEN - 1)
            return True

        return self._txn(fn, self._keys.forget_receipts)

    def set_router(self, router: RouterRecord, *, priors: Mapping[str, float] | None = None) -> int:
        """Install ``router`` as the active router (replacing any); returns the new epoch.

        ``priors`` (compartment id -> lambda_i) are written to those of the compartments that are active, in the
        same transaction (one epoch bump for both).
        """

        def fn(pipe: redis.client.Pipeline) -> int:
            epoch = self._epoch(pipe) + 1
            active = {text(c) for c in pipe.smembers(self._keys.active)}
            pipe.multi()
            for cid, prior in (priors or {}).items():
                if cid in active:
                    pipe.hset(self._keys.compartment(cid), "prior", repr(float(prior)))
            pipe.delete(self._keys.router)
            pipe.hset(self._keys.router, mapping=_mapping(to_hash(router)))
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

    def set_routing(self, kind: str) -> int:
        """Make ``kind`` ("learnt" | "density" | "heads") the routing kind; returns the epoch after the call.

        A new kind changes how every sampler composes, so the epoch is bumped once (with a change-log entry and an
        event); setting the kind already in force changes nothing (an unset key reads as "learnt"). Raises
        ValueError naming the allowed kinds.
        """
        try:
            new = RoutingKind(kind)
        except ValueError:
            raise ValueError(f"routing kind {kind!r} is not one of {[k.value for k in RoutingKind]}") from None

        def fn(pipe: redis.client.Pipeline) -> int:
            stored = pipe.get(self._keys.routing)
            current = routing_kind(stored)
            epoch = self._epoch(pipe)
            pipe.multi()
            if current is new:
                if stored is None:
                    pipe.set(self._keys.routing, new.value)  # make the default explicit; the composition is the same
                return epoch
            pipe.set(self._keys.routing, new.value)
            pipe.set(self._keys.epoch, epoch + 1)
            self._announce(pipe, epoch + 1, "routing", detail={"kind": new.value, "previous": current.value})
            return epoch + 1

        return self._txn(fn, self._keys.routing, self._keys.epoch)

    def record_audit(self, kind: str, doc: Mapping[str, Any]) -> None:
        """Append ``{**doc, "kind": kind, "at": now}`` (JSON-able) to the audit list (``kind`` wins over doc's)."""
        entry = json.dumps({**dict(doc), "kind": kind, "at": self._clock()}, sort_keys=True)
        with self._r.pipeline(transaction=True) as pipe:
            pipe.lpush(self._keys.audit, entry)
            pipe.ltrim(self._keys.audit, 0, AUDIT_MAXLEN - 1)
            pipe.execute()


def _mapping(mapping: Mapping[str, str]) -> Any:
    """A str -> str hash for redis-py's HSET/XADD mappings (whose declared key and value types are invariant)."""
    return mapping


def _request_id(request_id: str) -> str:
    if not request_id or len(request_id) > 256:
        raise ValueError(f"request id {request_id[:80]!r} must be 1-256 characters")
    return request_id


def _audit(kind: str, at: float, **fields: Any) -> str:
    return json.dumps({"kind": kind, "at": at, **fields}, sort_keys=True)
