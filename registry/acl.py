"""Access rights in the registry: bearer tokens -> principals -> grants -> the sources a principal may see.

A principal is a name (``alice``, ``team-a@acme``). It may see a source when one of its grants matches it::

    all               every source
    source:NAME       that source
    tag:KEY=VALUE     every source tagged KEY=VALUE (tags live in ``ns:tags:{source}``, by source name, so a
                      source that arrives later with a matching tag joins at once, and a new version keeps them)

Tokens are ``cdm_`` + 43 characters of URL-safe base64 (256 random bits). Only their sha256 is stored, in the
key that looks them up (``ns:acl:token:{sha256}``): a fast unsalted hash is right for random tokens (unlike
passwords they cannot be guessed from a dictionary, so a slow KDF would only add latency to every request),
and a dump of Redis reveals no usable token. The stored digest is compared with ``hmac.compare_digest``.

Every change that writes several keys is one MULTI/EXEC transaction and appends an entry to the registry's
audit list (``ns:audit``). Nothing here changes the composition, so the epoch never moves. ``ServeLedger`` keeps
what ``cdm serve`` shares between replicas: per-principal in-flight slots (crash-safe leases in a sorted set)
and the capped audit stream of API requests.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import redis
import redis.client

from registry import scripts
from registry.keys import AUDIT_MAXLEN, Keys, check_principal, check_source, parse_compartment_id
from registry.records import decode_hash, text

TOKEN_PREFIX = "cdm_"
TOKEN_BYTES = 32  # 256 random bits
_TOKEN = re.compile(r"cdm_[A-Za-z0-9_-]{43}")
_TAG_PART = re.compile(r"[A-Za-z0-9._-]{1,64}")
GrantKind = Literal["all", "source", "tag"]


# --------------------------------------------------------------------------------------------- tokens


def new_token() -> str:
    """A fresh bearer token: ``cdm_`` + 256 random bits, URL-safe base64 without padding."""
    raw = base64.urlsafe_b64encode(secrets.token_bytes(TOKEN_BYTES)).rstrip(b"=").decode()
    return TOKEN_PREFIX + raw


def is_token(value: str) -> bool:
    """Whether ``value`` has the form of a token (says nothing about whether it is valid)."""
    return bool(_TOKEN.fullmatch(value))


def hash_token(token: str) -> str:
    """sha256 hex of the token text (what is stored and looked up)."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class TokenRecord:
    """A stored token (never its text)."""

    token_id: str  # public id for listing and revoking ("tok_" + 12 hex)
    principal: str
    sha256: str  # of the token text
    label: str = ""  # what it is for ("ci", "laptop of alice")
    created_at: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "token_id": self.token_id,
            "principal": self.principal,
            "label": self.label,
            "created_at": self.created_at,
        }


@dataclass(frozen=True)
class IssuedToken:
    """A token just created: ``token`` is shown once and never stored."""

    token: str
    record: TokenRecord


# --------------------------------------------------------------------------------------------- grants and tags


def parse_tag(value: str) -> tuple[str, str]:
    """``"KEY=VALUE"`` -> (key, value); ValueError naming the bad text and the allowed form."""
    key, sep, val = value.partition("=")
    if not sep or not _TAG_PART.fullmatch(key) or not _TAG_PART.fullmatch(val):
        raise ValueError(f"tag {value!r} must be KEY=VALUE, each 1-64 characters from A-Z a-z 0-9 . _ -")
    return key, val


def check_tag_key(key: str) -> str:
    if not _TAG_PART.fullmatch(key):
        raise ValueError(f"tag key {key!r} must be 1-64 characters from A-Z a-z 0-9 . _ -")
    return key


@dataclass(frozen=True, order=True)
class Grant:
    """One grant of a principal: every source, one source by name, or every source with one tag."""

    kind: GrantKind
    value: str = ""  # source name, or "KEY=VALUE"

    @classmethod
    def parse(cls, text_: str) -> Grant:
        """``all``, ``source:NAME`` or ``tag:KEY=VALUE``; ValueError otherwise."""
        if text_ == "all":
            return cls("all")
        kind, sep, value = text_.partition(":")
        if sep and kind == "source":
            return cls("source", check_source(value))
        if sep and kind == "tag":
            parse_tag(value)
            return cls("tag", value)
        raise ValueError(f"grant {text_!r} must be 'all', 'source:NAME' or 'tag:KEY=VALUE'")

    def __str__(self) -> str:
        return "all" if self.kind == "all" else f"{self.kind}:{self.value}"

    def matches(self, source: str, tags: Mapping[str, str]) -> bool:
        if self.kind == "all":
            return True
        if self.kind == "source":
            return source == self.value
        key, _, value = self.value.partition("=")
        return tags.get(key) == value


def allowed_sources(
    grants: Iterable[Grant], candidates: Sequence[str], tags: Mapping[str, Mapping[str, str]]
) -> list[str]:
    """The ``candidates`` (in their order) that at least one grant matches; ``tags``: source -> its tags."""
    grants = tuple(grants)
    return [s for s in candidates if any(g.matches(s, tags.get(s, {})) for g in grants)]


@dataclass(frozen=True)
class AccessView:
    """What one request may use, read in one round trip (``AccessRegistry.view``)."""

    principal: str
    grants: tuple[Grant, ...]
    tags: Mapping[str, Mapping[str, str]]  # source -> tags, for the candidate sources
    active_sources: frozenset[str]  # sources with an active compartment in the registry right now

    def allowed(self, candidates: Sequence[str]) -> list[str]:
        """``candidates`` the principal may see and that are still active (a forgotten source never is)."""
        live = [s for s in candidates if s in self.active_sources]
        return allowed_sources(self.grants, live, self.tags)


# --------------------------------------------------------------------------------------------- the registry side

Clock = Callable[[], float]


class AccessRegistry:
    """Tokens, grants and source tags in Redis.

    Args:
        client: a redis-py client (bytes or ``decode_responses=True``); the caller owns and closes it.
        keys: key names under the configured namespace.
        clock: wall-clock seconds for timestamps.
    """

    def __init__(self, client: redis.Redis, keys: Keys, clock: Clock = time.time) -> None:
        self._r = client
        self._keys = keys
        self._clock = clock

    @property
    def keys(self) -> Keys:
        return self._keys

    @property
    def client(self) -> redis.Redis:
        """The Redis client (the caller's; ``ServeLedger`` may share it)."""
        return self._r

    def _audit(self, pipe: redis.client.Pipeline, kind: str, **fields: Any) -> None:
        pipe.lpush(self._keys.audit, json.dumps({"kind": kind, "at": self._clock(), **fields}, sort_keys=True))
        pipe.ltrim(self._keys.audit, 0, AUDIT_MAXLEN - 1)

    # -- tokens

    def create_token(self, principal: str, label: str = "") -> IssuedToken:
        """A new token for ``principal`` (created if new). The text is in the result only: show it once."""
        check_principal(principal)
        if len(label) > 200:
            raise ValueError(f"token label is {len(label)} characters; keep it to 200")
        token = new_token()
        record = TokenRecord(
            token_id="tok_" + secrets.token_hex(6),
            principal=principal,
            sha256=hash_token(token),
            label=label,
            created_at=self._clock(),
        )
        with self._r.pipeline(transaction=True) as pipe:
            pipe.hset(
                self._keys.token(record.sha256),
                mapping={
                    "token_id": record.token_id,
                    "principal": principal,
                    "sha256": record.sha256,
                    "label": label,
                    "created_at": repr(record.created_at),
                },
            )
            pipe.hset(self._keys.tokens, record.token_id, record.sha256)
            pipe.sadd(self._keys.principals, principal)
            self._audit(pipe, "acl-token-create", principal=principal, token_id=record.token_id, label=label)
            pipe.execute()
        return IssuedToken(token, record)

    def resolve_token(self, token: str) -> TokenRecord | None:
        """The record of a valid token, None for anything else (malformed, unknown or revoked)."""
        if not is_token(token):
            return None
        digest = hash_token(token)
        raw = decode_hash(self._r.hgetall(self._keys.token(digest)))
        if not raw or not hmac.compare_digest(raw.get("sha256", "").encode(), digest.encode()):
            return None
        return _token_record(raw)

    def revoke_token(self, token_id: str) -> TokenRecord | None:
        """Delete a token by id (effective for the next request); None when there is no such token."""

        def fn(pipe: redis.client.Pipeline) -> TokenRecord | None:
            digest = pipe.hget(self._keys.tokens, token_id)
            if digest is None:
                pipe.multi()
                return None
            key = self._keys.token(text(digest))
            raw = decode_hash(pipe.hgetall(key))
            pipe.multi()
            pipe.delete(key)
            pipe.hdel(self._keys.tokens, token_id)
            record = _token_record(raw) if raw else None
            self._audit(pipe, "acl-token-revoke", token_id=token_id, principal=record.principal if record else None)
            return record

        result: Any = self._r.transaction(fn, self._keys.tokens, value_from_callable=True)  # type: ignore[arg-type]
        return result if isinstance(result, TokenRecord) else None

    def tokens(self, principal: str | None = None) -> list[TokenRecord]:
        """Every token (or ``principal``'s), oldest first; never their text."""
        digests = [text(d) for d in self._r.hvals(self._keys.tokens)]
        with self._r.pipeline(transaction=False) as pipe:
            for d in digests:
                pipe.hgetall(self._keys.token(d))
            raws = [decode_hash(r) for r in pipe.execute()]
        records = [_token_record(r) for r in raws if r]
        if principal is not None:
            records = [r for r in records if r.principal == principal]
        return sorted(records, key=lambda r: (r.created_at, r.token_id))

    # -- grants

    def grant(self, principal: str, grants: Sequence[Grant]) -> tuple[Grant, ...]:
        """Add ``grants`` to ``principal`` (created if new); returns all its grants."""
        check_principal(principal)
        if not grants:
            raise ValueError("name at least one grant (--all, --source NAME or --tag KEY=VALUE)")
        with self._r.pipeline(transaction=True) as pipe:
            pipe.sadd(self._keys.grants(principal), *(str(g) for g in grants))
            pipe.sadd(self._keys.principals, principal)
            self._audit(pipe, "acl-grant", principal=principal, grants=sorted(str(g) for g in grants))
            pipe.execute()
        return self.grants_of(principal)

    def revoke(self, principal: str, grants: Sequence[Grant]) -> tuple[Grant, ...]:
        """Remove ``grants`` from ``principal``; returns what is left."""
        check_principal(principal)
        if not grants:
            raise ValueError("name at least one grant to revoke (--all, --source NAME or --tag KEY=VALUE)")
        with self._r.pipeline(transaction=True) as pipe:
            pipe.srem(self._keys.grants(principal), *(str(g) for g in grants))
            self._audit(pipe, "acl-revoke", principal=principal, grants=sorted(str(g) for g in grants))
            pipe.execute()
        return self.grants_of(principal)

    def grants_of(self, principal: str) -> tuple[Grant, ...]:
        return _grants(self._r.smembers(self._keys.grants(principal)))

    def principals(self) -> list[str]:
        return sorted(text(p) for p in self._r.smembers(self._keys.principals))

    # -- tags

    def set_tags(self, source: str, tags: Mapping[str, str]) -> dict[str, str]:
        """Set (or overwrite) tags of ``source`` (it need not exist yet); returns all its tags."""
        check_source(source)
        for key, value in tags.items():
            parse_tag(f"{key}={value}")
        if not tags:
            raise ValueError("name at least one KEY=VALUE tag")
        with self._r.pipeline(transaction=True) as pipe:
            pipe.hset(self._keys.tags(source), mapping=dict(tags))  # type: ignore[arg-type]
            self._audit(pipe, "acl-tag", source=source, tags=dict(tags))
            pipe.execute()
        return self.tags_of(source)

    def remove_tags(self, source: str, tag_keys: Sequence[str]) -> dict[str, str]:
        """Remove tags of ``source`` by key; returns what is left."""
        check_source(source)
        if not tag_keys:
            raise ValueError("name at least one tag key to remove")
        with self._r.pipeline(transaction=True) as pipe:
            pipe.hdel(self._keys.tags(source), *(check_tag_key(k) for k in tag_keys))
            self._audit(pipe, "acl-untag", source=source, keys=sorted(tag_keys))
            pipe.execute()
        return self.tags_of(source)

    def tags_of(self, source: str) -> dict[str, str]:
        return decode_hash(self._r.hgetall(self._keys.tags(source)))

    def tagged_sources(self) -> list[str]:
        """Every source with at least one tag (registered or not yet), sorted (SCAN: for admin commands)."""
        prefix = self._keys.tags_prefix
        return sorted(text(k)[len(prefix) :] for k in self._r.scan_iter(match=prefix + "*", count=500))

    def tags_of_many(self, sources: Sequence[str]) -> dict[str, dict[str, str]]:
        with self._r.pipeline(transaction=False) as pipe:
            for s in sources:
                pipe.hgetall(self._keys.tags(s))
            return {s: decode_hash(raw) for s, raw in zip(sources, pipe.execute(), strict=True)}

    # -- one request

    def view(self, principal: str, sources: Sequence[str]) -> AccessView:
        """Grants, the tags of ``sources`` and the active sources, in one round trip.

        The cost does not depend on which of ``sources`` the principal may see: every source's tags are read.
        """
        with self._r.pipeline(transaction=False) as pipe:
            pipe.smembers(self._keys.grants(principal))
            pipe.smembers(self._keys.active)
            for s in sources:
                pipe.hgetall(self._keys.tags(s))
            grants_raw, active_raw, *tags_raw = pipe.execute()
        active = frozenset(parse_compartment_id(text(cid))[0] for cid in active_raw)
        tags = {s: decode_hash(raw) for s, raw in zip(sources, tags_raw, strict=True)}
        return AccessView(principal=principal, grants=_grants(grants_raw), tags=tags, active_sources=active)


def _grants(raw: Iterable[Any]) -> tuple[Grant, ...]:
    out = []
    for g in raw:
        try:
            out.append(Grant.parse(text(g)))
        except ValueError:
            continue  # a malformed grant written by hand grants nothing (fail closed)
    return tuple(sorted(out))


def _token_record(raw: Mapping[str, str]) -> TokenRecord:
    return TokenRecord(
        token_id=raw.get("token_id", ""),
        principal=raw.get("principal", ""),
        sha256=raw.get("sha256", ""),
        label=raw.get("label", ""),
        created_at=float(raw.get("created_at") or 0.0),
    )


# --------------------------------------------------------------------------------------------- cdm serve


class ServeLedger:
    """What ``cdm serve`` replicas share: per-principal in-flight slots and the audit stream of requests.

    Args:
        client: a redis-py client; the caller owns and closes it.
        keys: key names under the configured namespace.
        audit_maxlen: approximate cap of the audit stream (``XADD MAXLEN ~``).
    """

    def __init__(self, client: redis.Redis, keys: Keys, *, audit_maxlen: int = 100_000) -> None:
        if audit_maxlen < 1:
            raise ValueError(f"audit_maxlen = {audit_maxlen} must be >= 1")
        self._r = client
        self._keys = keys
        self._audit_maxlen = audit_maxlen
        self._acquire = scripts.register(client, "acquire_slot")

    def acquire(self, principal: str, request_id: str, *, limit: int, lease_ms: int) -> bool:
        """Take one of ``limit`` slots of ``principal`` for ``lease_ms`` (expired leases are dropped first)."""
        return bool(self._acquire(keys=[self._keys.inflight(principal)], args=[request_id, int(lease_ms), int(limit)]))

    def release(self, principal: str, request_id: str) -> None:
        self._r.zrem(self._keys.inflight(principal), request_id)

    def in_flight(self, principal: str) -> int:
        """Slots held now (including leases that expired but were not dropped yet)."""
        return int(self._r.zcard(self._keys.inflight(principal)))

    def append(self, entry: Mapping[str, str | int | float]) -> str:
        """Append one request to the audit stream; returns the entry id."""
        fields = {k: str(v) for k, v in entry.items()}
        entry_id = self._r.xadd(
            self._keys.serve_audit,
            fields,  # type: ignore[arg-type]
            maxlen=self._audit_maxlen,
            approximate=True,
        )
        return text(entry_id)

    def audit(self, count: int = 100) -> list[dict[str, str]]:
        """The newest ``count`` requests, newest first."""
        rows = self._r.xrevrange(self._keys.serve_audit, count=count) or []
        return [{"id": text(i), **decode_hash(fields)} for i, fields in rows]
