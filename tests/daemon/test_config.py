"""daemon/config.py: strict TOML loading, typed sections, client keyword arguments."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer

from cdm.errors import ConfigError
from daemon.config import (
    AppConfig,
    KafkaConfig,
    load_config,
    parse_config,
    with_services,
)
from registry.config import RedisConfig

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_none_gives_defaults() -> None:
    cfg = load_config(None)
    assert cfg == AppConfig()
    assert cfg.kafka.sources_topic == "cdm.sources"
    assert cfg.kafka.control_topic == "cdm.control"
    assert cfg.kafka.dlq_topic == "cdm.dlq"
    assert cfg.kafka.group_id == "cdm"
    assert cfg.redis.namespace == "cdm"


def test_repository_config_toml_loads_and_matches_defaults() -> None:
    """The documented config.toml in the repo root is valid and spells out the defaults."""
    path = REPO / "config.toml"
    if not path.exists():
        pytest.skip("no config.toml in the repository root")
    cfg = load_config(path)
    assert cfg.kafka == KafkaConfig()
    assert cfg.redis == RedisConfig()
    assert cfg == dataclasses.replace(AppConfig(), library=cfg.library)


def test_sections_are_read(tmp_path: Path) -> None:
    cfg = load_config(
        write(
            tmp_path,
            """
[kafka]
bootstrap_servers = "k1:9092,k2:9092"
group_id = "g"
[redis]
url = "redis://r:6380/2"
namespace = "prod"
[daemon]
http_port = 0
device = "cuda"
[scheduler]
heartbeat_s = 1.5
[train]
steps = 7
""",
        )
    )
    assert cfg.kafka.bootstrap_servers == "k1:9092,k2:9092"
    assert cfg.kafka.group_id == "g"
    assert cfg.redis.namespace == "prod"
    assert cfg.daemon.http_port == 0
    assert cfg.daemon.device == "cuda"
    assert cfg.scheduler.heartbeat_s == 1.5
    assert cfg.library.train.steps == 7
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.kafka.group_id = "x"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.kafka = KafkaConfig()  # type: ignore[misc]


def test_unknown_section_is_rejected_by_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown section\(s\).*kafak"):
        load_config(write(tmp_path, "[kafak]\nbootstrap_servers = 'x:1'\n"))


def test_unknown_top_level_key_is_rejected_by_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="debug"):
        load_config(write(tmp_path, "debug = true\n"))


@pytest.mark.parametrize(
    ("section", "key"),
    [("kafka", "bootstrap_server"), ("redis", "uri"), ("daemon", "http_prot"), ("scheduler", "gc"), ("model", "x")],
)
def test_unknown_key_is_rejected_by_name(tmp_path: Path, section: str, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"\[{section}\].*{key}"):
        load_config(write(tmp_path, f"[{section}]\n{key} = 1\n"))


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("[daemon]\nhttp_port = '80'\n", r"daemon.http_port = '80' \(from config.toml\) must be an integer"),
        ("[daemon]\nhttp_port = 70000\n", "daemon.http_port = 70000 .*must be <= 65535"),
        ("[daemon]\nheartbeat_ttl_s = true\n", "must be a number"),
        ("[daemon]\ndevice = 'tpu'\n", "choose one of 'cpu' or 'cuda'"),
        ("[redis]\ntls = 'yes'\n", "true or false"),
        ("[redis]\nurl = 'http://x'\n", "redis://"),
        ("[kafka]\nsecurity_protocol = 'TLS'\n", "choose one of"),
        ("[kafka]\nsession_timeout_ms = 1000\nheartbeat_interval_ms = 3000\n", "below"),
        ("[kafka]\nmax_message_bytes = 0\n", "kafka.max_message_bytes = 0 .*must be >= 16384"),
        ("[kafka]\nmax_message_bytes = 16383\n", "must be >= 16384"),
        ("[daemon]\nmax_decoded_bytes = 0\n", r"daemon.max_decoded_bytes = 0 \(from config.toml\) must be >= 1"),
        ("[daemon]\nmax_claim_check_bytes = -1\n", "daemon.max_claim_check_bytes = -1 .*must be >= 1"),
        ("[daemon]\nmax_chunks_per_source = 0\n", "must be >= 1"),
        ("[daemon]\nmax_chunks_per_source = 1000000001\n", "must be <= 1000000000"),
        ("[scheduler]\nheartbeat_s = 20.0\n", "heartbeat_ttl_s"),
        ("[scheduler]\nlock_refresh_s = 10\n", r"unknown key\(s\) in \[scheduler\]: lock_refresh_s"),
    ],
)
def test_types_and_values_are_checked(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(write(tmp_path, text))


def test_int_accepted_where_float_expected(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "[daemon]\nlock_ttl_s = 90\n"))
    assert cfg.daemon.lock_ttl_s == 90.0 and isinstance(cfg.daemon.lock_ttl_s, float)


def test_bad_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[kafka\n"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_kafka_client_kwargs_plaintext_has_no_sasl_or_ssl() -> None:
    kw = KafkaConfig(bootstrap_servers="h:1").client_kwargs()
    assert kw == {"bootstrap_servers": "h:1", "client_id": "cdm-daemon", "security_protocol": "PLAINTEXT"}


def test_kafka_client_kwargs_with_sasl_ssl() -> None:
    cfg = parse_config(
        {
            "kafka": {
                "security_protocol": "SASL_SSL",
                "sasl_mechanism": "SCRAM-SHA-512",
                "sasl_plain_username": "u",
                "sasl_plain_password": "hunter2",
                "ssl_cafile": "/ca.pem",
            }
        }
    ).kafka
    kw = cfg.client_kwargs()
    assert kw["security_protocol"] == "SASL_SSL"
    assert kw["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (kw["sasl_plain_username"], kw["sasl_plain_password"]) == ("u", "hunter2")
    assert kw["ssl_cafile"] == "/ca.pem"
    assert "ssl_certfile" not in kw and "ssl_keyfile" not in kw
    assert "hunter2" not in repr(cfg)  # the password stays out of logs


@pytest.mark.parametrize(
    ("table", "match"),
    [
        ({"security_protocol": "SASL_PLAINTEXT"}, "needs kafka.sasl_mechanism"),
        ({"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN"}, "sasl_plain_username"),
        ({"sasl_mechanism": "PLAIN", "sasl_plain_username": "u", "sasl_plain_password": "p"}, "SASL_PLAINTEXT"),
        ({"ssl_cafile": "/ca.pem"}, "SSL or SASL_SSL"),
        ({"security_protocol": "SSL", "ssl_certfile": "/c.pem"}, "together"),
    ],
)
def test_kafka_security_settings_must_be_coherent(table: dict[str, str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_config({"kafka": table})


def test_kafka_kwargs_are_accepted_by_kafka_python() -> None:
    """kafka-python rejects unknown configs at construction; these are checked without a broker."""
    cfg = KafkaConfig()
    for cls, kwargs in (
        (KafkaConsumer, cfg.consumer_kwargs()),
        (KafkaProducer, cfg.producer_kwargs()),
        (KafkaAdminClient, cfg.client_kwargs()),
    ):
        unknown = set(kwargs) - set(cls.DEFAULT_CONFIG)
        assert not unknown, (cls.__name__, unknown)
    consumer = cfg.consumer_kwargs()
    assert consumer["enable_auto_commit"] is False
    assert consumer["group_id"] == "cdm"
    assert consumer["max_partition_fetch_bytes"] == cfg.max_message_bytes
    assert cfg.producer_kwargs(linger_ms=5)["linger_ms"] == 5


def test_invalid_redis_section_is_a_config_error(tmp_path: Path) -> None:
    """registry.config raises its own error; the daemon reports it like every other section."""
    with pytest.raises(ConfigError, match="TLS is off"):
        load_config(write(tmp_path, "[redis]\ntls_ca_certs = '/ca.pem'\n"))
    services = tmp_path / "services.json"
    services.write_text(json.dumps({"redis_url": "http://x", "kafka_bootstrap": "127.0.0.1:6"}))
    with pytest.raises(ConfigError, match="redis://"):
        with_services(AppConfig(), services)


def test_to_dict_redacts_secrets() -> None:
    cfg = parse_config({"redis": {"password": "pw"}})
    assert cfg.to_dict()["redis"]["password"] == "***"
    assert cfg.to_dict(redact=False)["redis"]["password"] == "pw"
    json.dumps(cfg.to_dict())


def test_with_services_overrides_addresses(tmp_path: Path) -> None:
    services = tmp_path / "services.json"
    services.write_text(json.dumps({"redis_url": "redis://127.0.0.1:5/0", "kafka_bootstrap": "127.0.0.1:6"}))
    base = parse_config({"kafka": {"group_id": "g"}})
    cfg = with_services(base, services)
    assert cfg.kafka.bootstrap_servers == "127.0.0.1:6"
    assert cfg.redis.url == "redis://127.0.0.1:5/0"
    assert cfg.kafka.group_id == "g"  # everything else kept
    with pytest.raises(ConfigError, match="make services-start"):
        with_services(base, tmp_path / "missing.json")
    services.write_text("{}")
    with pytest.raises(ConfigError, match="kafka_bootstrap"):
        with_services(base, services)


def test_the_cache_lies_beside_the_daemons_artifact_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One rule for the daemon, the CLI, `cdm serve` and the demo: a relative [artifacts] cache_dir is below the
    parent of [daemon] artifact_dir, whatever the working directory."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "c.toml"
    path.write_text('[daemon]\nartifact_dir = "run/artifacts"\n')
    cfg = load_config(path, environ={})
    assert cfg.cache_base_dir == tmp_path / "run"
    path.write_text(f'[daemon]\nartifact_dir = "{tmp_path / "abs" / "artifacts"}"\n')
    assert load_config(path, environ={}).cache_base_dir == tmp_path / "abs"
