"""registry/coordination.py: owner-checked locks and heartbeats against the real redis-server."""

from __future__ import annotations

import time

import pytest
import redis

from registry.coordination import Coordinator
from registry.errors import IdentityInUse
from registry.keys import Keys

pytestmark = pytest.mark.services


def expire_now(client: redis.Redis, key: str) -> None:
    """Let ``key`` run out as its TTL would, without waiting out a real lease: a 1 ms TTL, then until it is gone."""
    assert client.pexpire(key, 1), f"{key} does not exist"
    deadline = time.monotonic() + 5
    while client.exists(key):  # an expired key reads as absent on the next access
        assert time.monotonic() < deadline, f"{key} outlived its 1 ms TTL"
        time.sleep(0.001)


@pytest.fixture
def coordinator(redis_client: redis.Redis, keys: Keys) -> Coordinator:
    return Coordinator(redis_client, keys)


# --------------------------------------------------------------------------------------------- locks


def test_source_lock_exclusive_owner_only(coordinator: Coordinator) -> None:
    assert coordinator.acquire_source_lock("shoes", "daemon-a", ttl_s=10)
    assert not coordinator.acquire_source_lock("shoes", "daemon-b", ttl_s=10)
    assert coordinator.source_lock_owner("shoes") == "daemon-a"
    assert not coordinator.release_source_lock("shoes", "daemon-b")  # not the owner
    assert not coordinator.refresh_source_lock("shoes", "daemon-b", ttl_s=10)
    assert coordinator.source_lock_owner("shoes") == "daemon-a"
    assert coordinator.acquire_source_lock("bags", "daemon-b", ttl_s=10)  # other sources are independent
    assert coordinator.release_source_lock("shoes", "daemon-a")
    assert not coordinator.release_source_lock("shoes", "daemon-a")  # already released
    assert coordinator.acquire_source_lock("shoes", "daemon-b", ttl_s=10)


def test_source_lock_expires_and_refresh_extends(
    coordinator: Coordinator, redis_client: redis.Redis, keys: Keys
) -> None:
    assert coordinator.acquire_source_lock("shoes", "a", ttl_s=0.5)
    assert 0 < redis_client.pttl(keys.source_lock("shoes")) <= 500
    assert coordinator.refresh_source_lock("shoes", "a", ttl_s=30)
    assert redis_client.pttl(keys.source_lock("shoes")) > 29_000  # extended from now
    assert coordinator.release_source_lock("shoes", "a")
    assert coordinator.acquire_source_lock("shoes", "a", ttl_s=30)
    expire_now(redis_client, keys.source_lock("shoes"))
    assert coordinator.source_lock_owner("shoes") is None  # expired
    assert not coordinator.refresh_source_lock("shoes", "a", ttl_s=1)  # lost: refresh must not resurrect it
    assert coordinator.acquire_source_lock("shoes", "b", ttl_s=1)


def test_job_lock(coordinator: Coordinator, redis_client: redis.Redis, keys: Keys) -> None:
    assert coordinator.acquire_job_lock("router", "a", ttl_s=5)
    assert not coordinator.acquire_job_lock("router", "b", ttl_s=5)
    assert coordinator.refresh_job_lock("router", "a", ttl_s=5)
    assert coordinator.release_job_lock("router", "a")
    assert coordinator.acquire_job_lock("router", "b", ttl_s=5)
    expire_now(redis_client, keys.job_lock("router"))  # b's lease ran out: a may take it, b may not refresh it
    assert not coordinator.refresh_job_lock("router", "b", ttl_s=5)
    assert coordinator.acquire_job_lock("router", "a", ttl_s=5)


# --------------------------------------------------------------------------------------------- heartbeat


def test_heartbeat_ttl(coordinator: Coordinator, redis_client: redis.Redis, keys: Keys) -> None:
    coordinator.heartbeat("d1", ttl_s=0.5, info={"host": "h", "pid": 1})
    coordinator.heartbeat("d2", ttl_s=10, info={"host": "h", "pid": 2})
    live = coordinator.live_daemons()
    assert [d.daemon_id for d in live] == ["d1", "d2"]
    assert live[0].info == {"host": "h", "pid": 1}
    assert 0 < live[0].ttl_s <= 0.5
    assert 0 < redis_client.pttl(keys.daemon("d1")) <= 500
    expire_now(redis_client, keys.daemon("d1"))
    assert [d.daemon_id for d in coordinator.live_daemons()] == ["d2"]
    assert redis_client.zrange(keys.daemons, 0, -1) == [b"d2"]  # the expired one left the index
    coordinator.heartbeat("d1", ttl_s=10, info={"pid": 1})  # back again
    assert [d.daemon_id for d in coordinator.live_daemons()] == ["d1", "d2"]
    coordinator.clear_heartbeat("d2")
    assert [d.daemon_id for d in coordinator.live_daemons()] == ["d1"]


# --------------------------------------------------------------------------------------------- identity


def test_claim_identity_refuses_a_live_holder_and_replaces_a_dead_one(coordinator: Coordinator) -> None:
    first = {"host": "h", "pid": 10, "nonce": "a"}
    assert coordinator.claim_identity("cdm-0", 30, first, holder_is_dead=lambda h: False) is None
    assert coordinator.heartbeat_info("cdm-0") == first
    second = {"host": "h", "pid": 11, "nonce": "b"}
    with pytest.raises(IdentityInUse, match=r"cdm-0.*held by a live daemon.*pid 10"):
        coordinator.claim_identity("cdm-0", 30, second, holder_is_dead=lambda h: False)
    assert coordinator.heartbeat_info("cdm-0") == first  # untouched
    seen: list[dict] = []
    predecessor = coordinator.claim_identity("cdm-0", 30, second, holder_is_dead=lambda h: seen.append(h) or True)
    assert predecessor == first and seen == [first]
    assert coordinator.heartbeat_info("cdm-0") == second
    assert [d.daemon_id for d in coordinator.live_daemons()] == ["cdm-0"]


def test_release_locks_takes_back_only_the_owners(coordinator: Coordinator) -> None:
    assert coordinator.acquire_source_lock("shoes", "cdm-0", ttl_s=60)
    assert coordinator.acquire_source_lock("bags", "cdm-1", ttl_s=60)
    assert coordinator.acquire_job_lock("router", "cdm-0", ttl_s=60)
    released = coordinator.release_locks("cdm-0")
    assert len(released) == 2 and all(k.endswith((":shoes", ":router")) for k in released)
    assert coordinator.source_lock_owner("shoes") is None and coordinator.source_lock_owner("bags") == "cdm-1"
    assert coordinator.acquire_source_lock("shoes", "cdm-0", ttl_s=60)  # at once, no lease to wait out
