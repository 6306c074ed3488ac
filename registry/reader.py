"""The registry's read side: atomic snapshots, records, the change log, and a watch that never misses an epoch.

Samplers use ``RegistryClient`` alone; the daemon's writer (``registry.writer.Registry``) extends it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis
import redis.client

from registry import scripts
from registry.errors import CompartmentNotFound, RecordError
from registry.keys import Keys, compartment_id
from registry.records import (
    ChangeEvent,
    CompartmentRecord,
    RegistrySnapshot,
    RouterRecord,
    RoutingKind,
    Tombstone,
    decode_hash,
    from_hash,
    routing_kind,
    text,
)

log = logging.getLogger(__name__)


class _ReconnectAwarePubSub(redis.client.PubSub):
    """PubSub that counts reconnections: redis-py re-subscribes silently, losing what was published."""

    reconnects = 0

    def on_connect(self, connection: Any) -> None:
        self.reconnects += 1
        super().on_connect(connection)


@dataclass(frozen=True)
class Tombstones:
    """The tombstones of a set of sources, read at one moment.

    A tombstone hash that exists but cannot be decoded still means its source was forgotten: it is listed in
    ``unreadable`` (with the reason) so that readers can refuse everything of that source (fail closed).
    """

    by_source: Mapping[str, Tombstone]
    unreadable: Mapping[str, str]  # source -> why its tombstone cannot be decoded

    @property
    def sources(self) -> frozenset[str]:
        """Every forgotten source, readable or not."""
        return frozenset(self.by_source) | frozenset(self.unreadable)


class RegistryClient:
    """Read side for samplers: consistent snapshots and a watch that never misses the latest epoch.

    Args:
        client: a redis-py client (bytes or ``decode_responses=True``); the caller owns and closes it.
        keys: key names under the configured namespace.
    """

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self._r = client
        self._keys = keys
        self._snapshot_script = scripts.register(client, "snapshot")

    @property
    def keys(self) -> Keys:
        return self._keys

    # -- the composition

    def snapshot(self) -> RegistrySnapshot:
        """Epoch, active compartments, router and routing kind, read atomically (one Lua script)."""
        keys = self._keys
        reply = self._snapshot_script(
            keys=[keys.epoch, keys.active, keys.router, keys.routing], args=[keys.compartment_prefix]
        )
        epoch, router_raw, routing, rest = int(text(reply[0])), reply[1], routing_kind(reply[2]), reply[3:]
        compartments = tuple(
            from_hash(CompartmentRecord, rest[i + 1], compartment_id=text(rest[i]))
            for i in range(0, len(rest), 2)
            if rest[i + 1]
        )
        router = from_hash(RouterRecord, router_raw) if decode_hash(router_raw) else None
        return RegistrySnapshot(epoch=epoch, compartments=compartments, router=router, routing=routing)

    def epoch(self) -> int:
        value = self._r.get(self._keys.epoch)
        return int(text(value)) if value is not None else 0

    def routing(self) -> RoutingKind:
        """The routing kind (learnt when never set)."""
        return routing_kind(self._r.get(self._keys.routing))

    def active_ids(self) -> frozenset[str]:
        """Ids of the active compartments (read even when a record of the composition cannot be decoded)."""
        return frozenset(text(cid) for cid in self._r.smembers(self._keys.active))

    # -- forgetting

    def tombstone(self, source: str) -> Tombstone | None:
        """The tombstone of ``source`` if it was forgotten (RecordError if it cannot be decoded)."""
        raw = self._r.hgetall(self._keys.tombstone(source))
        return from_hash(Tombstone, raw, source=source) if raw else None

    def tombstones(self, also: Iterable[str] = ()) -> Tombstones:
        """The tombstones of every registered source and of the sources in ``also``, in one round trip."""
        sources = sorted(set(self.sources()) | set(also))
        with self._r.pipeline(transaction=False) as pipe:
            for source in sources:
                pipe.hgetall(self._keys.tombstone(source))
            raws = pipe.execute()
        found: dict[str, Tombstone] = {}
        unreadable: dict[str, str] = {}
        for source, raw in zip(sources, raws, strict=True):
            if not raw:
                continue
            try:
                found[source] = from_hash(Tombstone, raw, source=source)
            except RecordError as exc:
                unreadable[source] = str(exc)
        return Tombstones(found, unreadable)

    # -- records

    def get(self, compartment_id: str) -> CompartmentRecord:
        """One compartment (any status); CompartmentNotFound if unknown."""
        raw = self._r.hgetall(self._keys.compartment(compartment_id))
        if not raw:
            raise CompartmentNotFound(f"no compartment {compartment_id!r} in the registry")
        return from_hash(CompartmentRecord, raw, compartment_id=compartment_id)

    def get_many(self, compartment_ids: Sequence[str]) -> list[CompartmentRecord]:
        """The records of ``compartment_ids`` (any status) in one round trip, in order; unknown ids are left out."""
        with self._r.pipeline(transaction=False) as pipe:
            for cid in compartment_ids:
                pipe.hgetall(self._keys.compartment(cid))
            raws = pipe.execute()
        return [
            from_hash(CompartmentRecord, raw, compartment_id=cid)
            for cid, raw in zip(compartment_ids, raws, strict=True)
            if raw
        ]

    def history(self, source: str) -> list[CompartmentRecord]:
        """Every version of ``source``, oldest first."""
        version = self._r.hget(self._keys.source(source), "version")
        cids = [compartment_id(source, v) for v in range(1, int(text(version)) + 1)] if version else []
        with self._r.pipeline(transaction=False) as pipe:
            for cid in cids:
                pipe.hgetall(self._keys.compartment(cid))
            raws = pipe.execute()
        return [from_hash(CompartmentRecord, raw, compartment_id=c) for c, raw in zip(cids, raws, strict=True) if raw]

    def sources(self) -> list[str]:
        """Every source ever registered, sorted."""
        return sorted(text(s) for s in self._r.smembers(self._keys.sources))

    def compartment_for_fingerprint(self, source: str, fingerprint: str) -> CompartmentRecord | None:
        """The compartment (any status) trained or training on exactly this data of ``source``, if any."""
        cid = self._r.hget(self._keys.fingerprints(source), fingerprint)
        if cid is None:
            return None
        raw = self._r.hgetall(self._keys.compartment(text(cid)))
        return from_hash(CompartmentRecord, raw, compartment_id=text(cid)) if raw else None

    def changes(self, since_id: str = "0", count: int = 1000) -> list[ChangeEvent]:
        """Change-log entries after stream id ``since_id`` ("0": from the start), oldest first."""
        start = "-" if since_id in ("0", "0-0", "-") else f"({since_id}"
        entries = self._r.xrange(self._keys.changes, min=start, max="+", count=count) or []
        return [from_hash(ChangeEvent, fields, stream_id=text(stream_id)) for stream_id, fields in entries]

    def journal(self, request_id: str) -> dict[str, Any] | None:
        """The stored plan of forget request ``request_id`` (``cdm.lifecycle``), None if unknown."""
        raw = self._r.hget(self._keys.forget_journal, request_id)
        return dict(json.loads(raw)) if raw is not None else None

    def receipt(self, request_id: str) -> dict[str, Any] | None:
        """The receipt of forget request ``request_id`` (JSON of ``cdm.lifecycle.ForgetReceipt``), None if the
        request is unknown or not complete."""
        raw = self._r.hget(self._keys.forget_receipts, request_id)
        return dict(json.loads(raw)) if raw is not None else None

    def audit(self, limit: int = 100) -> list[dict[str, Any]]:
        """The newest ``limit`` audit entries, newest first."""
        return [json.loads(x) for x in self._r.lrange(self._keys.audit, 0, limit - 1)]

    # -- following the composition

    def iter_checks(
        self,
        stop_event: threading.Event,
        *,
        resync_s: float = 5.0,
        poll_s: float = 0.5,
        retry_s: float = 1.0,
    ) -> Iterator[None]:
        """Yield whenever the composition may have changed; the caller then reads what it needs.

        Pub/sub events are only a hint (they are lost while disconnected or before subscribing), so this also
        yields (1) right after every (re)subscription, (2) after redis-py silently reconnected, and (3) every
        ``resync_s`` seconds. Events that arrive between two checks are coalesced into one. Stops when
        ``stop_event`` is set (checked at least every ``poll_s`` seconds). Connection errors of the
        subscription are logged and retried every ``retry_s`` seconds (nothing is yielded meanwhile); errors of
        the caller's own reads are the caller's to handle.
        """
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
                        yield
                    wait = max(0.0, min(poll_s, next_resync - time.monotonic()))
                    message = pubsub.get_message(timeout=wait)
                    if message is not None and message.get("type") == "message":
                        check = True
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                log.warning("registry watch: %s; retrying in %.1fs", exc, retry_s)
                stop_event.wait(retry_s)
            finally:
                pubsub.close()

    def iter_snapshots(
        self,
        stop_event: threading.Event,
        *,
        resync_s: float = 5.0,
        poll_s: float = 0.5,
        retry_s: float = 1.0,
    ) -> Iterator[RegistrySnapshot]:
        """Yield a snapshot now and then whenever the epoch differs from the last one yielded.

        Checks happen as ``iter_checks`` describes. Changes that happen between two reads are coalesced: the
        newest composition is yielded, never a stale one. Epochs normally increase; a smaller one means the
        registry was reset and is yielded too. A connection error while reading is logged and the read is
        retried at the next check; a snapshot that cannot be decoded (RecordError) is raised to the caller.
        """
        last: int | None = None
        for _ in self.iter_checks(stop_event, resync_s=resync_s, poll_s=poll_s, retry_s=retry_s):
            try:
                if self.epoch() == last:
                    continue
                snap = self.snapshot()
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                log.warning("registry watch: %s; reading again at the next check", exc)
                continue
            if snap.epoch != last:
                last = snap.epoch
                yield snap

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
