"""registry/acl.py against the real Redis: access views, token look-ups, key names, serve slots."""

from __future__ import annotations

import pytest
import redis

from registry.acl import AccessRegistry, Grant, ServeLedger, hash_token, is_token, new_token
from registry.keys import Keys
from registry.writer import Registry
from tests.registry.conftest import train_and_activate


def test_tokens_are_random_256_bit_and_well_formed() -> None:
    tokens = {new_token() for _ in range(100)}
    assert len(tokens) == 100 and all(is_token(t) and len(t) == 47 for t in tokens)
    assert not is_token("cdm_short") and not is_token("xyz_" + "A" * 43)
    assert len(hash_token(next(iter(tokens)))) == 64


def test_view_reads_grants_tags_and_what_is_still_active(
    registry: Registry, redis_client: redis.Redis, keys: Keys
) -> None:
    for source in ("a", "b", "c"):
        train_and_activate(registry, source, f"fp-{source}")
    access = AccessRegistry(redis_client, keys)
    access.set_tags("b", {"team": "x"})
    access.grant("p", [Grant.parse("source:a"), Grant.parse("tag:team=x")])
    view = access.view("p", ["a", "b", "c"])
    assert view.allowed(["a", "b", "c"]) == ["a", "b"] and view.active_sources == {"a", "b", "c"}
    assert dict(view.tags["b"]) == {"team": "x"} and dict(view.tags["c"]) == {}
    registry.forget_source("a")
    assert access.view("p", ["a", "b", "c"]).allowed(["a", "b", "c"]) == ["b"], "a forgotten source is never allowed"
    # a malformed grant written by hand grants nothing
    redis_client.sadd(keys.grants("q"), "everything")
    assert access.view("q", ["b"]).allowed(["b"]) == []


def test_revoking_a_token_deletes_both_keys(redis_client: redis.Redis, keys: Keys) -> None:
    access = AccessRegistry(redis_client, keys)
    issued = access.create_token("p", "ci")
    assert redis_client.exists(keys.token(issued.record.sha256)) and access.revoke_token(issued.record.token_id)
    assert not redis_client.exists(keys.token(issued.record.sha256))
    assert not redis_client.hexists(keys.tokens, issued.record.token_id)
    assert access.revoke_token(issued.record.token_id) is None


def test_key_names_are_checked(keys: Keys) -> None:
    with pytest.raises(ValueError, match="principal"):
        keys.grants("no spaces")
    with pytest.raises(ValueError, match="sha256"):
        keys.token("ABC")
    assert keys.tags("shoes") == keys.tags_prefix + "shoes"


def test_serve_slots_are_per_principal_and_released(redis_client: redis.Redis, keys: Keys) -> None:
    ledger = ServeLedger(redis_client, keys)
    assert ledger.acquire("p", "r1", limit=2, lease_ms=60_000) and ledger.acquire("p", "r2", limit=2, lease_ms=60_000)
    assert not ledger.acquire("p", "r3", limit=2, lease_ms=60_000)
    assert ledger.acquire("q", "r1", limit=2, lease_ms=60_000)
    ledger.release("p", "r1")
    assert ledger.in_flight("p") == 1 and ledger.acquire("p", "r3", limit=2, lease_ms=60_000)
