"""Coordination between daemon replicas: leased locks and liveness heartbeats in Redis.

Locks are ``SET NX PX`` keys holding the owner's token (the daemon id); only the owner releases or extends one,
checked and done atomically in Lua (``registry/lua/release.lua``, ``refresh.lua``). A daemon is alive while its
heartbeat key exists: liveness is the key's Redis TTL alone, so no daemon's clock is trusted.

A daemon id is a stable identity (the hostname in a StatefulSet): at start-up a daemon *claims* it
(:meth:`Coordinator.claim_identity`), which fails while another live process holds it, and then takes back the
locks its dead predecessor under the same id still held (:meth:`Coordinator.release_locks`) instead of waiting
for their leases to run out.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from typing import Any

import redis

from registry import scripts
from registry.errors import IdentityInUse
from registry.keys import Keys
from registry.records import DaemonInfo, text

Clock = Callable[[], float]


def _ms(seconds: float) -> int:
    if seconds <= 0:
        raise ValueError(f"ttl {seconds} s must be > 0")
    return max(1, int(seconds * 1000))


class Coordinator:
    """Locks and heartbeats. All methods are safe to call concurrently from several daemons.

    Args:
        client: a redis-py client (bytes or ``decode_responses=True``); the caller owns and closes it.
        keys: key names under the configured namespace.
        clock: wall-clock seconds recorded in the daemons index (injectable for tests).
    """

    def __init__(self, client: redis.Redis, keys: Keys, clock: Clock = time.time) -> None:
        self._r = client
        self._keys = keys
        self._clock = clock
        self._release_script = scripts.register(client, "release")
        self._refresh_script = scripts.register(client, "refresh")
        self._prune_script = scripts.register(client, "prune")
        self._replace_script = scripts.register(client, "replace")

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
        return text(value) if value is not None else None

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

    def release_locks(self, owner: str) -> list[str]:
        """Release every lock ``owner`` holds (a restarted daemon taking back its dead predecessor's locks).

        Returns the lock keys released. Only call this once ``claim_identity`` proved no other live process
        uses ``owner``.
        """
        released = []
        for key in self._r.scan_iter(match=self._keys.lock_prefix + "*", count=500):
            name = text(key)
            if self._release_script(keys=[name], args=[owner]):
                released.append(name)
        return sorted(released)

    # -- daemon identity and liveness

    def claim_identity(
        self,
        daemon_id: str,
        ttl_s: float,
        info: Mapping[str, Any],
        *,
        holder_is_dead: Callable[[Mapping[str, Any]], bool],
    ) -> dict[str, Any] | None:
        """Take ``daemon_id`` for this process: write its heartbeat unless another live process holds it.

        Args:
            daemon_id: the identity (stable across restarts).
            ttl_s: heartbeat lifetime.
            info: this process's heartbeat (JSON-able; must differ from any predecessor's, e.g. by a start nonce).
            holder_is_dead: given the current holder's heartbeat info, True when that process is known to be gone
                (e.g. it ran on this host and its pid is no longer that process).

        Returns the dead predecessor's info when one was replaced, else None. Raises IdentityInUse when a live
        (or not provably dead) process holds the id.
        """
        key, mine = self._keys.daemon(daemon_id), json.dumps(dict(info), sort_keys=True)
        for _ in range(5):
            if self._r.set(key, mine, nx=True, px=_ms(ttl_s)):
                self._r.zadd(self._keys.daemons, {daemon_id: self._clock()})
                return None
            raw = self._r.get(key)
            if raw is None:
                continue  # expired meanwhile: try to take it again
            try:
                holder = json.loads(raw)
            except ValueError:
                holder = {}
            if not isinstance(holder, dict) or not holder_is_dead(holder):
                raise IdentityInUse(
                    f"daemon id {daemon_id!r} is held by a live daemon (host {holder.get('host')!r}, pid "
                    f"{holder.get('pid')!r}; its heartbeat expires in {self._r.pttl(key) / 1000:.0f}s); give this "
                    "replica its own [daemon] daemon_id (default: the hostname) or stop the other one"
                )
            if self._replace_script(keys=[key], args=[raw, mine, _ms(ttl_s)]):
                self._r.zadd(self._keys.daemons, {daemon_id: self._clock()})
                return dict(holder)
        raise IdentityInUse(f"daemon id {daemon_id!r} kept changing hands while this daemon tried to claim it")

    def heartbeat_info(self, daemon_id: str) -> dict[str, Any] | None:
        """The heartbeat info of ``daemon_id`` while it is alive, else None."""
        raw = self._r.get(self._keys.daemon(daemon_id))
        return dict(json.loads(raw)) if raw is not None else None

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
        ids = sorted(text(d) for d in self._r.zrange(self._keys.daemons, 0, -1))
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
