"""Every Redis key, stream and channel name of the registry, in one place (like rq's and arq's constants).

All names start with the configured namespace (``[redis] namespace``, default ``cdm``), so several
deployments (or tests) can share one Redis server. ``ns`` below stands for that prefix.

Compartment ids are ``"<source>@v<version>"``: source names follow ``common.names`` (the one source-name rule) so the
id is unambiguous and every key stays printable.

=========================================  ===========  =====================================================
key                                        type         contents
=========================================  ===========  =====================================================
``ns:compartment:{id}``                    hash         one compartment (``CompartmentRecord``): source,
                                                        version, status (training|active|retired),
                                                        artifact_uri, sha256 (JSON map file -> sha256), prior,
                                                        class_counts (JSON list), n_samples, fingerprint,
                                                        train_metrics (JSON), created_at, updated_at,
                                                        lineage (JSON: topic, partitions, offsets / chunk
                                                        refs), retired_reason
``ns:active``                              set          ids of the active compartments (the composition)
``ns:sources``                             set          every source name ever registered
``ns:source:{source}``                     hash         per-source index: ``current`` (active compartment id),
                                                        ``training`` (id being trained), ``version`` (counter;
                                                        never reset, so ids are never reused)
``ns:fingerprints:{source}``               hash         data fingerprint -> compartment id (idempotency)
``ns:router``                              hash         the active router (``RouterRecord``)
``ns:routing``                             string       the routing kind (``RoutingKind``: learnt | density | heads;
                                                        unset = learnt): how samplers compose, and whether
                                                        the daemon trains a router
``ns:epoch``                               string/int   incremented exactly once per change of the composition
                                                        (active set, active records, router or
                                                        routing kind)
``ns:changes``                             stream       change log, one entry per registry change (capped)
``ns:events``                              pub/sub      ``{"epoch", "kind", ...}`` after each change (lossy:
                                                        readers must also re-read ``ns:epoch``)
``ns:lock:source:{source}``                string       owner token of the per-source training lock (PX TTL)
``ns:lock:job:{name}``                     string       owner token of a singleton job lock (router, gc)
``ns:daemon:{daemon_id}``                  string       JSON heartbeat of a live daemon (PX TTL)
``ns:daemons``                             zset         daemon id -> last heartbeat (unix s); index for listing
``ns:tombstone:{source}``                  hash         a forgotten source (``Tombstone``): forgotten_at, epoch,
                                                        request_id, through (JSON "topic:partition" -> offset),
                                                        files_sha256 (JSON list of the forgotten artifacts' sha256,
                                                        purged by readers), compartment_ids (JSON list)
``ns:forget:journal``                      hash         request id -> JSON plan of a forget request in progress
                                                        (``cdm.lifecycle``: old and new ids, steps done)
``ns:forget:receipts``                     hash         request id -> the request's one receipt (JSON,
                                                        ``cdm.lifecycle.ForgetReceipt``), written once
``ns:audit``                               list         JSON audit entries, newest first (forget, retire,
                                                        acl changes)
``ns:tags:{source}``                       hash         the source's tags (key -> value, e.g. license=cc-by);
                                                        kept by source name, so they outlive versions and may
                                                        be set before the source first arrives
``ns:acl:principals``                      set          every principal with a grant or a token
``ns:acl:grants:{principal}``              set          the principal's grants: ``source:NAME``,
                                                        ``tag:KEY=VALUE`` or ``all`` (registry/acl.py)
``ns:acl:token:{sha256}``                  hash         one bearer token, by the sha256 hex of its text:
                                                        token_id, principal, sha256, label, created_at
``ns:acl:tokens``                          hash         token id -> sha256 hex (listing and revoking by id)
``ns:serve:inflight:{principal}``          zset         request id -> lease expiry (unix ms) of the
                                                        principal's running requests on every replica
``ns:serve:audit``                         stream       one entry per ``cdm serve`` API request: principal,
                                                        token id, route, status, sources used, epoch, n
                                                        (capped, ``[serve] audit_maxlen``)
=========================================  ===========  =====================================================
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from common.names import SOURCE_NAME_PATTERN, check_source_name

_COMPARTMENT_ID = re.compile(rf"(?P<source>{SOURCE_NAME_PATTERN.pattern})@v(?P<version>[1-9][0-9]*)")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
PRINCIPAL_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,127}")
_SHA256 = re.compile(r"[0-9a-f]{64}")

CHANGES_MAXLEN = 100_000  # approximate cap of the change-log stream (XADD MAXLEN ~)
AUDIT_MAXLEN = 100_000  # audit list entries kept


def check_source(source: str) -> str:
    """``source`` if it follows the source-name rule (``common.names``), else ValueError naming it and the rule."""
    return check_source_name(source)


def compartment_id(source: str, version: int) -> str:
    """The id of version ``version`` (>= 1) of ``source``'s compartment."""
    if version < 1:
        raise ValueError(f"compartment version {version} must be >= 1")
    return f"{check_source(source)}@v{version}"


def parse_compartment_id(cid: str) -> tuple[str, int]:
    """(source, version) of a compartment id; ValueError if it is not ``<source>@v<version>``."""
    match = _COMPARTMENT_ID.fullmatch(cid)
    if match is None:
        raise ValueError(f"compartment id {cid!r} is not of the form <source>@v<version>")
    return match["source"], int(match["version"])


def check_principal(principal: str) -> str:
    """``principal`` if it is a valid principal name, else ValueError naming it and the allowed form."""
    if not isinstance(principal, str) or not PRINCIPAL_PATTERN.fullmatch(principal):
        raise ValueError(
            f"principal {principal!r} is not allowed; use 1-128 characters from A-Z a-z 0-9 . _ @ -, "
            "starting with a letter or digit"
        )
    return principal


def _check_name(kind: str, name: str) -> str:
    if not _NAME.fullmatch(name):
        raise ValueError(f"{kind} {name!r} is not allowed; use 1-128 characters from A-Z a-z 0-9 . _ : -")
    return name


@dataclass(frozen=True)
class Keys:
    """Key names under one namespace. Build once from ``RedisConfig.namespace`` and pass it in."""

    namespace: str = "cdm"

    def __post_init__(self) -> None:
        if not self.namespace or any(c in self.namespace for c in " {}*?[]"):
            raise ValueError(f"namespace {self.namespace!r} must be non-empty, without spaces, braces or globs")

    def _k(self, *parts: str) -> str:
        return ":".join((self.namespace, *parts))

    # -- compartments and the composition
    def compartment(self, cid: str) -> str:
        """Hash of one compartment."""
        parse_compartment_id(cid)
        return self._k("compartment", cid)

    @property
    def compartment_prefix(self) -> str:
        """``compartment(cid) == compartment_prefix + cid`` (for Lua scripts)."""
        return self._k("compartment", "")

    @property
    def active(self) -> str:
        """Set of active compartment ids."""
        return self._k("active")

    @property
    def sources(self) -> str:
        """Set of every registered source name."""
        return self._k("sources")

    def source(self, source: str) -> str:
        """Per-source index hash: current, training, version."""
        return self._k("source", check_source(source))

    def fingerprints(self, source: str) -> str:
        """Hash fingerprint -> compartment id of one source."""
        return self._k("fingerprints", check_source(source))

    @property
    def router(self) -> str:
        """Hash of the active router."""
        return self._k("router")

    @property
    def routing(self) -> str:
        """The routing kind (string)."""
        return self._k("routing")

    @property
    def epoch(self) -> str:
        """Composition epoch counter."""
        return self._k("epoch")

    # -- change notification
    @property
    def changes(self) -> str:
        """Change-log stream."""
        return self._k("changes")

    @property
    def events(self) -> str:
        """Pub/sub channel announcing each change (lossy; re-read ``epoch``)."""
        return self._k("events")

    # -- coordination
    def source_lock(self, source: str) -> str:
        """Per-source training lock."""
        return self._k("lock", "source", check_source(source))

    def job_lock(self, name: str) -> str:
        """Singleton job lock (e.g. "router", "gc")."""
        return self._k("lock", "job", _check_name("job name", name))

    def daemon(self, daemon_id: str) -> str:
        """Heartbeat key of one daemon."""
        return self._k("daemon", _check_name("daemon id", daemon_id))

    @property
    def daemons(self) -> str:
        """Sorted set daemon id -> last heartbeat time (liveness is the heartbeat key's TTL)."""
        return self._k("daemons")

    # -- forgetting
    def tombstone(self, source: str) -> str:
        """Hash of a forgotten source (``Tombstone``)."""
        return self._k("tombstone", check_source(source))

    @property
    def forget_journal(self) -> str:
        """Hash request id -> JSON plan of a forget request (its steps, old and new ids)."""
        return self._k("forget", "journal")

    @property
    def forget_receipts(self) -> str:
        """Hash request id -> the request's receipt (JSON), written once when the request is complete."""
        return self._k("forget", "receipts")

    @property
    def lock_prefix(self) -> str:
        """Every lock key starts with this (``SCAN`` pattern ``lock_prefix + "*"``)."""
        return self._k("lock", "")

    @property
    def audit(self) -> str:
        """Audit list (newest first)."""
        return self._k("audit")

    # -- access rights (registry/acl.py)
    def tags(self, source: str) -> str:
        """Hash of the source's tags (key -> value)."""
        return self._k("tags", check_source(source))

    @property
    def tags_prefix(self) -> str:
        """``tags(source) == tags_prefix + source`` (for SCAN)."""
        return self._k("tags", "")

    @property
    def principals(self) -> str:
        """Set of every principal with a grant or a token."""
        return self._k("acl", "principals")

    def grants(self, principal: str) -> str:
        """Set of the principal's grants (``source:NAME``, ``tag:KEY=VALUE``, ``all``)."""
        return self._k("acl", "grants", check_principal(principal))

    def token(self, sha256_hex: str) -> str:
        """Hash of one bearer token, addressed by the sha256 hex of the token text."""
        if not _SHA256.fullmatch(sha256_hex):
            raise ValueError(f"{sha256_hex!r} is not a lowercase sha256 hex digest")
        return self._k("acl", "token", sha256_hex)

    @property
    def tokens(self) -> str:
        """Hash token id -> sha256 hex."""
        return self._k("acl", "tokens")

    # -- cdm serve
    def inflight(self, principal: str) -> str:
        """Sorted set request id -> lease expiry (unix ms) of the principal's running requests."""
        return self._k("serve", "inflight", check_principal(principal))

    @property
    def serve_audit(self) -> str:
        """Stream of ``cdm serve`` requests (capped)."""
        return self._k("serve", "audit")
