"""The daemon's typed, frozen configuration: every section of ``config.toml`` in one ``AppConfig``.

Sections: the library's ``[model] [train] [router] [sample] [eval]`` (``cdm.config``), ``[artifacts]``
(``cdm.artifacts.config``), the registry's ``[redis]`` (``registry.config``), ``cdm serve``'s ``[serve]``
(``api.config``) and ``[kafka] [daemon] [scheduler]`` below; each a frozen pydantic dataclass
(``common.settings``) with its ranges. Sources, in this order, each overriding the one before key by key::

    defaults  <-  config.toml  <-  services.json  <-  environment CDM_<SECTION>__<KEY>  <-  CLI flags
                  (--config)       (deploy/local's    (e.g. CDM_REDIS__PASSWORD,          (cli: replace(...))
                                    addresses)         CDM_TRAIN__DEVICE=cuda)

    cfg = load_config(path, services=services_json)   # all but the flags; environ defaults to os.environ

Every refusal is a ``cdm.errors.ConfigError`` naming the key, its value (secrets masked) and where it came from.
Nothing here opens a connection: ``KafkaConfig.*_kwargs()`` produce the keyword arguments for kafka-python, and
``registry.client.connect(cfg.redis)`` builds redis-py clients; the caller owns them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import AfterValidator, Field, model_validator

from api.config import ServeConfig
from cdm.artifacts.config import ArtifactsConfig
from cdm.config import LIBRARY_SECTIONS, Device, LibraryConfig, parse_library
from cdm.errors import ConfigError
from common.redact import safe
from common.settings import build, env_tables, merge, section, to_dict
from registry.config import RedisConfig
from registry.errors import RegistryConfigError

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]

MIN_MESSAGE_BYTES = 16 * 1024  # = daemon.wire.DLQ_MIN_RECORD_BYTES (not imported: config stays free of numpy)
MAX_CHUNKS_PER_SOURCE = 1_000_000_000  # = daemon.wire.MAX_SEQ + 1
DAY_S = 86_400.0
_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")
T = TypeVar("T")

Seconds = Annotated[float, Field(gt=0, le=DAY_S)]  # an interval or lease: (0 s, one day]
Bytes = Annotated[int, Field(ge=1, le=1 << 50)]  # a size limit: 1 byte .. 1 PiB
NonEmpty = Annotated[str, Field(min_length=1)]


def _check_bootstrap(servers: str) -> str:
    items = [s.strip() for s in servers.split(",")]
    for item in items:
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f"has {item!r}, which is not host:port (port 1..65535); give host:port[,host:port...]")
    return servers


def _check_topic(topic: str) -> str:
    if not _TOPIC.fullmatch(topic) or topic in (".", ".."):
        raise ValueError("is not a Kafka topic name (1-249 characters of [A-Za-z0-9._-], not '.' or '..')")
    return topic


DAEMON_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")  # a registry key part (registry.keys)


def _check_daemon_id(daemon_id: str) -> str:
    if daemon_id and not DAEMON_ID.fullmatch(daemon_id):
        raise ValueError(
            "must be empty (the hostname) or 1-128 characters of [A-Za-z0-9._:-] starting with a letter or digit"
        )
    return daemon_id


Topic = Annotated[str, AfterValidator(_check_topic)]


@section("kafka", error=ConfigError)
class KafkaConfig:
    """``[kafka]``: the broker, the topics the daemon uses and its consumer-group settings."""

    bootstrap_servers: Annotated[str, AfterValidator(_check_bootstrap)] = "127.0.0.1:9092"  # host:port[,...]
    sources_topic: Topic = "cdm.sources"  # data sources (chunked .npz payloads) to train on
    control_topic: Topic = "cdm.control"  # commands: seal, forget, retrain router, ...
    dlq_topic: Topic = "cdm.dlq"  # messages that cannot be decoded or validated, with the reason
    group_id: Annotated[str, Field(min_length=1, max_length=255)] = "cdm"  # consumer group of all daemon replicas
    client_id: Annotated[str, Field(min_length=1, max_length=255)] = "cdm-daemon"  # in broker logs and metrics
    security_protocol: SecurityProtocol = "PLAINTEXT"
    sasl_mechanism: SaslMechanism | None = None  # required with SASL_PLAINTEXT / SASL_SSL
    sasl_plain_username: NonEmpty | None = None
    sasl_plain_password: str | None = Field(default=None, repr=False)
    ssl_cafile: NonEmpty | None = None  # CA bundle (PEM) to verify the broker; with SSL / SASL_SSL
    ssl_certfile: NonEmpty | None = None  # client certificate (PEM) for mutual TLS
    ssl_keyfile: NonEmpty | None = None  # client private key (PEM) for mutual TLS
    # a member silent this long is dropped from the group (brokers allow 6 s .. 30 min by default)
    session_timeout_ms: Annotated[int, Field(ge=1_000, le=3_600_000)] = 10_000
    heartbeat_interval_ms: Annotated[int, Field(ge=100, le=3_600_000)] = 3_000  # below session_timeout_ms
    # longest gap between polls before the member is dropped (at most a day)
    max_poll_interval_ms: Annotated[int, Field(ge=1_000, le=86_400_000)] = 300_000
    # largest record produced or accepted (bigger ones -> DLQ), 16 KiB .. 1 GiB
    max_message_bytes: Annotated[int, Field(ge=MIN_MESSAGE_BYTES, le=1 << 30)] = 4 * 1024 * 1024
    create_topics: bool = True  # create the three topics at start-up if missing (off where ACLs forbid it)
    partitions: Annotated[int, Field(ge=1, le=10_000)] = 4  # of created topics: the most daemons one group can use
    replication_factor: Annotated[int, Field(ge=1, le=32)] = 1  # replicas of created topics (3 in production)

    @model_validator(mode="after")
    def _check(self) -> KafkaConfig:
        topics = {"sources_topic": self.sources_topic, "control_topic": self.control_topic, "dlq_topic": self.dlq_topic}
        if len(set(topics.values())) < len(topics):
            shown = ", ".join(f"kafka.{k} = {v!r}" for k, v in topics.items())
            raise ValueError(f"the three topics must differ ({shown}): each carries its own kind of record")
        if self.heartbeat_interval_ms >= self.session_timeout_ms:
            raise ValueError(
                f"kafka.heartbeat_interval_ms = {self.heartbeat_interval_ms} must be below "
                f"kafka.session_timeout_ms = {self.session_timeout_ms} (Kafka advises a third)"
            )
        if self.security_protocol.startswith("SASL_"):
            if self.sasl_mechanism is None:
                raise ValueError(
                    f"kafka.security_protocol = {self.security_protocol!r} needs kafka.sasl_mechanism "
                    "(PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512)"
                )
            if not self.sasl_plain_username or self.sasl_plain_password is None:
                raise ValueError(
                    f"kafka.sasl_mechanism = {self.sasl_mechanism!r} needs kafka.sasl_plain_username and "
                    "kafka.sasl_plain_password (e.g. CDM_KAFKA__SASL_PLAIN_PASSWORD)"
                )
        elif self.sasl_mechanism is not None:
            raise ValueError(
                f"kafka.sasl_mechanism is set but kafka.security_protocol = {self.security_protocol!r}; "
                "use SASL_PLAINTEXT or SASL_SSL"
            )
        uses_ssl = self.security_protocol in ("SSL", "SASL_SSL")
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            if getattr(self, name) is not None and not uses_ssl:
                raise ValueError(
                    f"kafka.{name} is set but kafka.security_protocol = {self.security_protocol!r}; use SSL or SASL_SSL"
                )
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("kafka.ssl_certfile and kafka.ssl_keyfile must be given together")
        return self

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


@section("daemon", error=ConfigError)
class DaemonConfig:
    """``[daemon]``: where the daemon keeps files, its HTTP endpoint and its timing."""

    # stable per replica ("" = the hostname, stable in a StatefulSet); two live daemons never share one
    daemon_id: Annotated[str, AfterValidator(_check_daemon_id)] = ""
    artifact_dir: NonEmpty = "store/artifacts"  # compartment and router artifacts (when [artifacts] url = "")
    spool_dir: NonEmpty = "store/spool"  # staged message chunks, durable before offsets are committed
    http_host: NonEmpty = "127.0.0.1"  # /metrics, /healthz, /readyz, /status
    http_port: Annotated[int, Field(ge=0, le=65535)] = 9464  # 0 = ephemeral (the bound port is logged and exposed)
    # a request (line, headers and body) not received within this is answered by closing the connection
    http_read_timeout_s: Annotated[float, Field(gt=0, le=300)] = 10.0
    # open connections at most; at the cap a new one evicts the oldest that has not sent a whole request yet
    http_max_connections: Annotated[int, Field(ge=8, le=100_000)] = 256
    # /readyz answers from a cached check (Redis, ingest, composition) recomputed at most this often
    readiness_refresh_s: Annotated[float, Field(gt=0, le=300)] = 2.0
    heartbeat_ttl_s: Seconds = 15.0  # the daemon's Redis heartbeat key expires after this
    lock_ttl_s: Seconds = 60.0  # per-source training lock lease (refreshed every third of it while training)
    source_idle_seal_s: Annotated[float, Field(gt=0, le=7 * DAY_S)] = 30.0  # a source idle this long is sealed
    # wait for the set of compartments to settle before retraining the router
    router_debounce_s: Annotated[float, Field(ge=0, le=DAY_S)] = 10.0
    gc_grace_s: Annotated[float, Field(ge=0, le=365 * DAY_S)] = 300.0  # retired artifacts are deleted after this
    poll_timeout_ms: Annotated[int, Field(ge=1, le=60_000)] = 500  # Kafka poll timeout (bounds shutdown latency)
    device: Device = "cpu"  # training / sampling device
    claim_check_dir: NonEmpty | None = None  # claim-check (chunk-ref) files must lie under it; unset refuses them
    max_claim_check_bytes: Bytes = 1 << 30  # largest claim-check file read; a pointer to a bigger one -> DLQ oversized
    max_decoded_bytes: Bytes = 1 << 30  # largest uncompressed size of one chunk's arrays; bigger -> DLQ oversized
    # a seal with more chunks, or a chunk with cdm-seq >= it -> too-many-chunks (cdm-seq has at most 9 digits)
    max_chunks_per_source: Annotated[int, Field(ge=1, le=MAX_CHUNKS_PER_SOURCE)] = 10_000
    # spool limits: a record over one is dead-lettered as limit-exceeded (docs/wire-format.md), checked before
    # anything is allocated or written; a source that breaks one is dropped whole, never trained on a prefix
    spool_max_sources: Annotated[int, Field(ge=1, le=1_000_000)] = 1024  # sources staged or sealed at once
    spool_max_source_samples: Annotated[int, Field(ge=1, le=1 << 40)] = 10_000_000  # samples per source
    spool_max_source_bytes: Bytes = 4 * 1024**3  # decoded array bytes per source (what training holds in memory)
    spool_max_bytes: Bytes = 32 * 1024**3  # chunk payload bytes on disk, all unregistered sources together
    ingest_retry_initial_s: Annotated[float, Field(gt=0, le=3600)] = 0.5  # first back-off after a broker/spool error
    ingest_retry_max_s: Annotated[float, Field(gt=0, le=3600)] = 30.0  # the back-off doubles up to this
    # how often (and how long at most) ingest checks that the broker answers (an offset look-up); a check that
    # fails is a broker failure: not ready, back off (a consumer's poll alone does not notice an outage)
    broker_check_s: Annotated[float, Field(gt=0, le=600)] = 5.0
    # a source whose training failed this often is dropped (dead-lettered: training-failed); failures while Redis
    # is unreachable do not count (retried until it is back)
    job_max_attempts: Annotated[int, Field(ge=1, le=1000)] = 5
    job_retry_initial_s: Seconds = 5.0  # first back-off after a failed training/forget job (a Redis outage, ...)
    job_retry_max_s: Seconds = 300.0  # the job back-off doubles per failure up to this (forget jobs retry forever)

    @model_validator(mode="after")
    def _check(self) -> DaemonConfig:
        if self.ingest_retry_initial_s > self.ingest_retry_max_s:
            raise ValueError(
                f"daemon.ingest_retry_initial_s = {self.ingest_retry_initial_s} must be <= "
                f"daemon.ingest_retry_max_s = {self.ingest_retry_max_s}"
            )
        if self.job_retry_initial_s > self.job_retry_max_s:
            raise ValueError(
                f"daemon.job_retry_initial_s = {self.job_retry_initial_s} must be <= "
                f"daemon.job_retry_max_s = {self.job_retry_max_s}"
            )
        if self.spool_max_source_bytes > self.spool_max_bytes:
            raise ValueError(
                f"daemon.spool_max_source_bytes = {self.spool_max_source_bytes} must be <= "
                f"daemon.spool_max_bytes = {self.spool_max_bytes} (one source must fit in the spool)"
            )
        return self


@section("scheduler", error=ConfigError)
class SchedulerConfig:
    """``[scheduler]``: intervals of the periodic jobs (APScheduler), in seconds (each in (0, 86400])."""

    heartbeat_s: Seconds = 5.0  # refresh the daemon heartbeat (must be below daemon.heartbeat_ttl_s)
    seal_check_s: Seconds = 5.0  # look for idle sources to seal
    router_check_s: Seconds = 5.0  # retrain the router when compartments changed (after the debounce)
    gc_s: Seconds = 60.0  # delete artifacts retired longer than daemon.gc_grace_s ago
    lag_s: Seconds = 10.0  # export consumer lag and staged bytes
    registry_resync_s: Seconds = 5.0  # re-read the registry epoch even without a pub/sub event
    misfire_grace_s: Annotated[float, Field(ge=1, le=DAY_S)] = 30.0  # a job later than this is skipped (coalesced)


SECTIONS: Mapping[str, Any] = {
    **LIBRARY_SECTIONS,
    "artifacts": ArtifactsConfig,
    "kafka": KafkaConfig,
    "redis": RedisConfig,
    "daemon": DaemonConfig,
    "scheduler": SchedulerConfig,
    "serve": ServeConfig,
}
SERVICE_SECTIONS = ("artifacts", "kafka", "redis", "daemon", "scheduler", "serve")


@section("config", error=ConfigError)
class AppConfig:
    """The whole ``config.toml``: library sections plus the services'."""

    library: LibraryConfig = Field(default_factory=LibraryConfig)
    artifacts: ArtifactsConfig = Field(default_factory=ArtifactsConfig)
    kafka: KafkaConfig = Field(default_factory=KafkaConfig)
    redis: RedisConfig = Field(default_factory=RedisConfig)
    daemon: DaemonConfig = Field(default_factory=DaemonConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)

    @model_validator(mode="after")
    def _check(self) -> AppConfig:
        if self.scheduler.heartbeat_s >= self.daemon.heartbeat_ttl_s:
            raise ValueError(
                f"scheduler.heartbeat_s = {self.scheduler.heartbeat_s} must be below "
                f"daemon.heartbeat_ttl_s = {self.daemon.heartbeat_ttl_s} (else it looks dead between beats)"
            )
        return self

    @property
    def cache_base_dir(self) -> Path:
        """Where a relative ``[artifacts] cache_dir`` lies: beside the daemon's artifact directory, so the daemon, the
        CLI, ``cdm serve`` and the demo on one host share one cache."""
        return Path(self.daemon.artifact_dir).resolve().parent

    def to_dict(self, *, redact: bool = True) -> dict[str, Any]:
        """JSON-able view, one table per section (for logs and /status); secrets become "***" and URLs lose
        their credentials unless ``redact=False``."""
        out = {name: to_dict(getattr(self.library, name), redact=redact) for name in LIBRARY_SECTIONS}
        out.update({name: to_dict(getattr(self, name), redact=redact) for name in SERVICE_SECTIONS})
        return out


def parse_config(
    doc: Mapping[str, Any], *, where: str = "config", origins: Mapping[str, Mapping[str, str]] | None = None
) -> AppConfig:
    """AppConfig from a parsed TOML document; unknown sections and keys are rejected by name.

    ``origins[section][key]`` names where a value came from (a file, an environment variable) for error messages.
    """
    unknown = sorted(set(doc) - set(SECTIONS))
    if unknown:
        raise ConfigError(
            f"unknown section(s) in {where}: {', '.join(safe(u, 64) for u in unknown)}; "
            f"allowed: {', '.join(sorted(SECTIONS))}"
        )
    src = origins or {}

    def section_of(name: str) -> Any:
        return build(SECTIONS[name], doc.get(name), origins=src.get(name))

    return AppConfig(
        library=parse_library(doc, origins=src),
        artifacts=section_of("artifacts"),
        kafka=section_of("kafka"),
        redis=_redis(lambda: section_of("redis")),
        daemon=section_of("daemon"),
        scheduler=section_of("scheduler"),
        serve=section_of("serve"),
    )


def read_toml(path: Path | str) -> dict[str, Any]:
    """A TOML file as a document; ConfigError for a missing, unreadable or malformed file."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None


def environment_overrides(environ: Mapping[str, str]) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, str]]]:
    """The ``CDM_<SECTION>__<KEY>`` variables of ``environ`` as a document, and the variable behind each key."""
    try:
        return env_tables(environ, SECTIONS)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def load_config(
    path: Path | str | None,
    *,
    environ: Mapping[str, str] | None = None,
    services: Path | str | None = None,
) -> AppConfig:
    """Every source but the CLI flags, in order: defaults <- ``path`` <- ``services`` <- the environment.

    Args:
        path: config.toml; ``None`` = none (the defaults).
        environ: where ``CDM_<SECTION>__<KEY>`` overrides are read (default ``os.environ``; ``{}`` = none).
        services: a deploy/local ``services.json`` whose Kafka and Redis addresses replace the file's.

    Raises ConfigError for a missing or malformed file, unknown sections/keys/variables and bad values.
    """
    docs: list[Mapping[str, Any]] = []
    origins: dict[str, dict[str, str]] = {}
    if path is not None:
        doc = read_toml(path)
        docs.append(doc)
        _note(origins, doc, Path(path).name)
    if services is not None:
        doc = services_doc(services)
        docs.append(doc)
        _note(origins, doc, Path(services).name)
    env_doc, env_origins = environment_overrides(os.environ if environ is None else environ)
    docs.append(env_doc)
    for sec, keys in env_origins.items():
        origins.setdefault(sec, {}).update(keys)
    where = str(path) if path is not None else "config"
    return parse_config(merge(*docs), where=where, origins=origins)


def _note(origins: dict[str, dict[str, str]], doc: Mapping[str, Any], label: str) -> None:
    for sec, table in doc.items():
        if isinstance(table, Mapping):
            origins.setdefault(sec, {}).update({str(k): label for k in table})


def services_doc(services_json_path: Path | str) -> dict[str, dict[str, Any]]:
    """deploy/local's ``services.json`` as a config document: ``[kafka] bootstrap_servers`` and ``[redis] url``."""
    path = Path(services_json_path)
    try:
        record = json.loads(path.read_text())
        bootstrap, redis_url = record["kafka_bootstrap"], record["redis_url"]
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist; start the services with `make services-start`") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path} is not a services.json (needs kafka_bootstrap, redis_url): {safe(exc)}") from None
    if not isinstance(bootstrap, str) or not isinstance(redis_url, str):
        raise ConfigError(f"{path}: kafka_bootstrap and redis_url must be strings")
    return {"kafka": {"bootstrap_servers": bootstrap}, "redis": {"url": redis_url}}


def with_services(cfg: AppConfig, services_json_path: Path | str) -> AppConfig:
    """``cfg`` with Kafka bootstrap and Redis url taken from deploy/local's ``services.json``."""
    doc = services_doc(services_json_path)
    return dataclasses.replace(
        cfg,
        kafka=dataclasses.replace(cfg.kafka, **doc["kafka"]),
        redis=_redis(lambda: dataclasses.replace(cfg.redis, **doc["redis"])),
    )


def _redis(make: Callable[[], T]) -> T:
    """``make()``, reporting an invalid ``[redis]`` value as ConfigError like every other section."""
    try:
        return make()
    except RegistryConfigError as exc:
        raise ConfigError(str(exc)) from None
