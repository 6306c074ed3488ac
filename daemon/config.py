"""The daemon's typed, frozen configuration: ``config.toml`` is read once with ``tomllib`` into ``AppConfig``.

Sections: the library's ``[model] [train] [router] [sample] [eval]`` (``cdm.config.LibraryConfig``), the
registry's ``[redis]`` (``registry.config.RedisConfig``), ``cdm serve``'s ``[serve]`` (``api.config.ServeConfig``) and
``[kafka] [daemon] [scheduler]`` below. Unknown
sections and keys raise ``cdm.errors.ConfigError`` naming them. Sources are applied in an explicit order by the caller::

    cfg = load_config(path)                       # defaults <- config.toml
    cfg = with_services(cfg, ".services/services.json")   # <- addresses of deploy/local services (optional)

Nothing here opens a connection: ``KafkaConfig.*_kwargs()`` produce the keyword arguments for kafka-python, and
``registry.client.connect(cfg.redis)`` builds redis-py clients; the caller owns them.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from api.config import ServeConfig
from cdm.config import Device, LibraryConfig, parse_library, parse_section, to_dict
from cdm.errors import ConfigError
from registry.config import RedisConfig
from registry.errors import RegistryConfigError

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]

LIBRARY_SECTIONS = ("model", "train", "router", "sample", "eval")
DAEMON_SECTIONS = ("kafka", "redis", "daemon", "scheduler", "serve")
_SECRET_FIELDS = frozenset({"sasl_plain_password", "password"})
MIN_MESSAGE_BYTES = 16 * 1024  # = daemon.wire.DLQ_MIN_RECORD_BYTES (not imported: config stays free of numpy)
MAX_CHUNKS_PER_SOURCE = 1_000_000_000  # = daemon.wire.MAX_SEQ + 1


def _positive(section: str, **values: float) -> None:
    for name, value in values.items():
        if value <= 0:
            raise ConfigError(f"{section}.{name} = {value!r} must be > 0")


@dataclass(frozen=True)
class KafkaConfig:
    """``[kafka]``: the broker, the topics the daemon uses and its consumer-group settings."""

    bootstrap_servers: str = "127.0.0.1:9092"  # "host:port[,host:port...]"
    sources_topic: str = "cdm.sources"  # data sources (chunked .npz payloads) to train on
    control_topic: str = "cdm.control"  # commands: seal, forget, retrain router, ...
    dlq_topic: str = "cdm.dlq"  # messages that cannot be decoded or validated, with the reason
    group_id: str = "cdm"  # consumer group shared by all daemon replicas
    client_id: str = "cdm-daemon"  # shows up in broker logs and metrics
    security_protocol: SecurityProtocol = "PLAINTEXT"
    sasl_mechanism: SaslMechanism | None = None  # required with SASL_PLAINTEXT / SASL_SSL
    sasl_plain_username: str | None = None
    sasl_plain_password: str | None = field(default=None, repr=False)
    ssl_cafile: str | None = None  # CA bundle (PEM) to verify the broker; with SSL / SASL_SSL
    ssl_certfile: str | None = None  # client certificate (PEM) for mutual TLS
    ssl_keyfile: str | None = None  # client private key (PEM) for mutual TLS
    session_timeout_ms: int = 10_000  # a member silent this long is dropped from the group
    heartbeat_interval_ms: int = 3_000  # must be below session_timeout_ms (Kafka advises a third)
    max_poll_interval_ms: int = 300_000  # longest gap between polls before the member is dropped
    max_message_bytes: int = 4 * 1024 * 1024  # largest record produced or accepted (bigger ones -> DLQ), >= 16 KiB
    create_topics: bool = True  # create the three topics at start-up if missing (off where ACLs forbid it)
    partitions: int = 4  # partitions of created topics: the most daemons one consumer group can spread over
    replication_factor: int = 1  # replicas of created topics (3 on a production Apache Kafka cluster)

    def __post_init__(self) -> None:
        if not self.bootstrap_servers.strip():
            raise ConfigError("kafka.bootstrap_servers is empty; give host:port[,host:port...]")
        _positive(
            "kafka",
            session_timeout_ms=self.session_timeout_ms,
            heartbeat_interval_ms=self.heartbeat_interval_ms,
            max_poll_interval_ms=self.max_poll_interval_ms,
            max_message_bytes=self.max_message_bytes,
            partitions=self.partitions,
            replication_factor=self.replication_factor,
        )
        if self.max_message_bytes < MIN_MESSAGE_BYTES:
            raise ConfigError(
                f"kafka.max_message_bytes = {self.max_message_bytes} must be at least {MIN_MESSAGE_BYTES} "
                "(a dead-letter copy reduced to its cdm-dlq-* headers must still fit)"
            )
        if self.heartbeat_interval_ms >= self.session_timeout_ms:
            raise ConfigError(
                f"kafka.heartbeat_interval_ms = {self.heartbeat_interval_ms} must be below "
                f"kafka.session_timeout_ms = {self.session_timeout_ms}"
            )
        if self.security_protocol.startswith("SASL_"):
            if self.sasl_mechanism is None:
                raise ConfigError(
                    f"kafka.security_protocol = {self.security_protocol!r} needs kafka.sasl_mechanism "
                    "(PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512)"
                )
            if not self.sasl_plain_username or self.sasl_plain_password is None:
                raise ConfigError(
                    f"kafka.sasl_mechanism = {self.sasl_mechanism!r} needs kafka.sasl_plain_username and "
                    "kafka.sasl_plain_password"
                )
        elif self.sasl_mechanism is not None:
            raise ConfigError(
                f"kafka.sasl_mechanism is set but kafka.security_protocol = {self.security_protocol!r}; "
                "use SASL_PLAINTEXT or SASL_SSL"
            )
        uses_ssl = self.security_protocol in ("SSL", "SASL_SSL")
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            if getattr(self, name) is not None and not uses_ssl:
                raise ConfigError(
                    f"kafka.{name} is set but kafka.security_protocol = {self.security_protocol!r}; use SSL or SASL_SSL"
                )
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ConfigError("kafka.ssl_certfile and kafka.ssl_keyfile must be given together")

    def client_kwargs(self) -> dict[str, Any]:
        """Connection settings accepted by every kafka-python client (KafkaAdminClient too).

        SASL and SSL keys appear only when configured, so a PLAINTEXT config gives plain defaults.
        """
        kwargs: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "client_id": self.client_id,
            "security_protocol": self.security_protocol,
        }
        if self.sasl_mechanism is not None:
            kwargs["sasl_mechanism"] = self.sasl_mechanism
            kwargs["sasl_plain_username"] = self.sasl_plain_username
            kwargs["sasl_plain_password"] = self.sasl_plain_password
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            if getattr(self, name) is not None:
                kwargs[name] = getattr(self, name)
        return kwargs

    def consumer_kwargs(self, **overrides: Any) -> dict[str, Any]:
        """``KafkaConsumer(**cfg.consumer_kwargs())``: group member with manual commits from the earliest.

        Offsets are committed by the caller only after the work is durable (``enable_auto_commit=False``).
        """
        kwargs = self.client_kwargs()
        kwargs.update(
            group_id=self.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=self.session_timeout_ms,
            heartbeat_interval_ms=self.heartbeat_interval_ms,
            max_poll_interval_ms=self.max_poll_interval_ms,
            max_partition_fetch_bytes=self.max_message_bytes,
            fetch_max_bytes=max(self.max_message_bytes, 50 * 1024 * 1024),
        )
        kwargs.update(overrides)
        return kwargs

    def producer_kwargs(self, **overrides: Any) -> dict[str, Any]:
        """``KafkaProducer(**cfg.producer_kwargs())``: idempotent, acks from all in-sync replicas."""
        kwargs = self.client_kwargs()
        kwargs.update(acks="all", enable_idempotence=True, max_request_size=self.max_message_bytes)
        kwargs.update(overrides)
        return kwargs


@dataclass(frozen=True)
class DaemonConfig:
    """``[daemon]``: where the daemon keeps files, its HTTP endpoint and its timing."""

    daemon_id: str = ""  # unique per replica; "" = "<hostname>-<pid>" chosen at start-up
    artifact_dir: str = "store/artifacts"  # compartment and router artifacts (safetensors + manifests)
    spool_dir: str = "store/spool"  # staged message chunks, durable before offsets are committed
    http_host: str = "127.0.0.1"  # /metrics, /healthz, /readyz
    http_port: int = 9464  # 0 = ephemeral (the bound port is logged and exposed)
    heartbeat_ttl_s: float = 15.0  # the daemon's Redis heartbeat key expires after this
    lock_ttl_s: float = 60.0  # per-source training lock lease (refreshed while training)
    source_idle_seal_s: float = 30.0  # a source with no new chunk for this long is sealed and trained
    router_debounce_s: float = 10.0  # wait for the set of compartments to settle before retraining the router
    gc_grace_s: float = 300.0  # retired artifacts are deleted this long after retirement
    poll_timeout_ms: int = 500  # Kafka poll timeout of the ingest loop (bounds shutdown latency)
    device: Device = "cpu"  # training / sampling device
    claim_check_dir: str | None = None  # claim-check (chunk-ref) files must lie under it; unset refuses them
    max_claim_check_bytes: int = 1 << 30  # largest claim-check file read; a pointer to a bigger one -> DLQ oversized
    max_decoded_bytes: int = 1 << 30  # largest uncompressed size of one chunk's arrays; bigger -> DLQ oversized
    max_chunks_per_source: int = 10_000  # a seal with more chunks, or a chunk with cdm-seq >= it -> too-many-chunks
    # spool limits: a record over one is dead-lettered as limit-exceeded (docs/wire-format.md), checked before
    # anything is allocated or written; a source that breaks one is dropped whole, never trained on a prefix
    spool_max_sources: int = 1024  # sources staged or sealed (not yet registered) at once
    spool_max_source_samples: int = 10_000_000  # samples per source (bounds a seal's "n_samples")
    spool_max_source_bytes: int = 4 * 1024**3  # decoded array bytes per source (what training holds in memory)
    spool_max_bytes: int = 32 * 1024**3  # chunk payload bytes on disk, all unregistered sources together
    ingest_retry_initial_s: float = 0.5  # first back-off after a broker / spool I/O failure in the ingest loop
    ingest_retry_max_s: float = 30.0  # the back-off doubles per consecutive failure up to this

    def __post_init__(self) -> None:
        if not 0 <= self.http_port <= 65535:
            raise ConfigError(f"daemon.http_port = {self.http_port} must be in 0..65535 (0 = ephemeral)")
        _positive(
            "daemon",
            heartbeat_ttl_s=self.heartbeat_ttl_s,
            lock_ttl_s=self.lock_ttl_s,
            source_idle_seal_s=self.source_idle_seal_s,
            poll_timeout_ms=self.poll_timeout_ms,
            spool_max_sources=self.spool_max_sources,
            spool_max_source_samples=self.spool_max_source_samples,
            spool_max_source_bytes=self.spool_max_source_bytes,
            spool_max_bytes=self.spool_max_bytes,
            ingest_retry_initial_s=self.ingest_retry_initial_s,
            ingest_retry_max_s=self.ingest_retry_max_s,
        )
        if self.router_debounce_s < 0 or self.gc_grace_s < 0:
            raise ConfigError("daemon.router_debounce_s and daemon.gc_grace_s must be >= 0")
        _positive("daemon", max_claim_check_bytes=self.max_claim_check_bytes, max_decoded_bytes=self.max_decoded_bytes)
        if not 1 <= self.max_chunks_per_source <= MAX_CHUNKS_PER_SOURCE:
            raise ConfigError(
                f"daemon.max_chunks_per_source = {self.max_chunks_per_source} must be in 1..{MAX_CHUNKS_PER_SOURCE} "
                "(cdm-seq has at most 9 digits)"
            )
        if self.ingest_retry_initial_s > self.ingest_retry_max_s:
            raise ConfigError(
                f"daemon.ingest_retry_initial_s = {self.ingest_retry_initial_s} must be <= "
                f"daemon.ingest_retry_max_s = {self.ingest_retry_max_s}"
            )


@dataclass(frozen=True)
class SchedulerConfig:
    """``[scheduler]``: intervals of the periodic jobs (APScheduler), in seconds."""

    heartbeat_s: float = 5.0  # refresh the daemon heartbeat (must be below daemon.heartbeat_ttl_s)
    lock_refresh_s: float = 20.0  # refresh held source locks (must be below daemon.lock_ttl_s)
    seal_check_s: float = 5.0  # look for idle sources to seal
    router_check_s: float = 5.0  # retrain the router when compartments changed (after the debounce)
    gc_s: float = 60.0  # delete artifacts retired longer than daemon.gc_grace_s ago
    lag_s: float = 10.0  # export consumer lag and staged bytes
    registry_resync_s: float = 5.0  # re-read the registry epoch even without a pub/sub event
    misfire_grace_s: float = 30.0  # a job late by more than this is skipped (coalesced)

    def __post_init__(self) -> None:
        _positive("scheduler", **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)})


@dataclass(frozen=True)
class AppConfig:
    """The whole ``config.toml``: library sections plus the daemon's."""

    library: LibraryConfig = field(default_factory=LibraryConfig)
    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)

    def __post_init__(self) -> None:
        if self.scheduler.heartbeat_s >= self.daemon.heartbeat_ttl_s:
            raise ConfigError(
                f"scheduler.heartbeat_s = {self.scheduler.heartbeat_s} must be below "
                f"daemon.heartbeat_ttl_s = {self.daemon.heartbeat_ttl_s} (else it looks dead between beats)"
            )
        if self.scheduler.lock_refresh_s >= self.daemon.lock_ttl_s:
            raise ConfigError(
                f"scheduler.lock_refresh_s = {self.scheduler.lock_refresh_s} must be below "
                f"daemon.lock_ttl_s = {self.daemon.lock_ttl_s} or locks expire while held"
            )

    def to_dict(self, *, redact: bool = True) -> dict[str, Any]:
        """JSON-able view (for logs and /readyz); secrets become "***" unless ``redact=False``."""
        out: dict[str, Any] = {name: to_dict(getattr(self.library, name)) for name in LIBRARY_SECTIONS}
        for name in DAEMON_SECTIONS:
            section = to_dict(getattr(self, name))
            if redact:
                section = {k: "***" if k in _SECRET_FIELDS and v is not None else v for k, v in section.items()}
            out[name] = section
        return out


def parse_config(doc: Mapping[str, Any], *, where: str = "config") -> AppConfig:
    """AppConfig from a parsed TOML document; unknown sections are rejected by name."""
    allowed = (*LIBRARY_SECTIONS, *DAEMON_SECTIONS)
    unknown = sorted(set(doc) - set(allowed))
    if unknown:
        raise ConfigError(f"unknown section(s) in {where}: {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
    return AppConfig(
        library=parse_library(doc),
        kafka=parse_section(KafkaConfig, doc.get("kafka"), "kafka"),
        redis=_redis(lambda: parse_section(RedisConfig, doc.get("redis"), "redis")),
        daemon=parse_section(DaemonConfig, doc.get("daemon"), "daemon"),
        scheduler=parse_section(SchedulerConfig, doc.get("scheduler"), "scheduler"),
        serve=parse_section(ServeConfig, doc.get("serve"), "serve"),
    )


def load_config(path: Path | None) -> AppConfig:
    """Read ``config.toml`` once; ``None`` gives the defaults.

    Raises ConfigError for a missing or malformed file, unknown sections/keys and wrong types.
    """
    if path is None:
        return AppConfig()
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    return parse_config(doc, where=str(path))


def with_services(cfg: AppConfig, services_json_path: Path | str) -> AppConfig:
    """``cfg`` with Kafka bootstrap and Redis url taken from deploy/local's ``services.json``."""
    path = Path(services_json_path)
    try:
        record = json.loads(path.read_text())
        bootstrap, redis_url = record["kafka_bootstrap"], record["redis_url"]
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist; start the services with `make services-start`") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path} is not a services.json (needs kafka_bootstrap, redis_url): {exc}") from None
    if not isinstance(bootstrap, str) or not isinstance(redis_url, str):
        raise ConfigError(f"{path}: kafka_bootstrap and redis_url must be strings")
    return dataclasses.replace(
        cfg,
        kafka=dataclasses.replace(cfg.kafka, bootstrap_servers=bootstrap),
        redis=_redis(lambda: dataclasses.replace(cfg.redis, url=redis_url)),
    )


def _redis(build: Callable[[], RedisConfig]) -> RedisConfig:
    """``build()``, reporting an invalid ``[redis]`` value as ConfigError like every other section."""
    try:
        return build()
    except RegistryConfigError as exc:
        raise ConfigError(str(exc)) from None
