"""deploy/compose: the compose files validate against the compose specification and agree with the configs.

* JSON schema: the compose-spec schema vendored in check-jsonschema (the raw file and the file interpolated with
  .env.example's values). It leaves durations, port syntax and most enums open, so:
* compose-spec (Python bindings of the compose_spec Rust crate) parses the interpolated file strictly (durations,
  ports, restart policies, depends_on conditions, unknown keys).
* Not covered without a Docker engine: that the images exist and start, that Kafka/MinIO accept their settings,
  and docker compose's own merge of the two files (each file is validated on its own).
"""

from __future__ import annotations

import importlib.resources
import json
import posixpath
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from compose_spec import PyOptions

from tests.deploy.common import (
    COMPOSE,
    GRAFANA,
    PROMETHEUS,
    env_overrides,
    load_toml,
    parse_deploy_config,
    read_env_file,
)

FILES = ["docker-compose.yml", "docker-compose.gpu.yml"]
CONFIG_PATH = "/etc/cdm/config.toml"
SECRET_KEYS = {"password", "sasl_plain_password", "access_key_id", "secret_access_key"}
_VARIABLE = re.compile(
    r"\$(?:\$|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])((?:[^{}]|\{[^{}]*\})*))?\}|([A-Za-z_][A-Za-z0-9_]*))"
)


def interpolate(text: str, env: dict[str, str]) -> str:
    """docker compose's variable substitution: $$, $VAR, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}."""

    def sub(match: re.Match[str]) -> str:
        if match[0] == "$$":
            return "$"
        name = match[1] or match[4]
        op, arg = match[2], match[3] or ""
        value = env.get(name)
        if op in (":-", "-"):
            return value if value or (op == "-" and value is not None) else arg
        if op in (":?", "?") and not value and not (op == "?" and value is not None):
            raise KeyError(f"${{{name}}} is required ({arg}) and .env.example does not set it")
        return value or ""

    return _VARIABLE.sub(sub, text)


def compose_schema() -> dict[str, Any]:
    text = (
        importlib.resources.files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json").read_text()
    )
    schema: dict[str, Any] = json.loads(text)
    return schema


def example_env() -> dict[str, str]:
    return read_env_file(COMPOSE / ".env.example")


def loaded(name: str = "docker-compose.yml") -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(interpolate((COMPOSE / name).read_text(), example_env()))
    return doc


def schema_errors(doc: Any) -> list[str]:
    validator = jsonschema.Draft202012Validator(compose_schema(), format_checker=jsonschema.FormatChecker())
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


# -- the specification ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FILES)
def test_validates_against_the_compose_schema(name: str) -> None:
    raw = yaml.safe_load((COMPOSE / name).read_text())
    assert schema_errors(raw) == []
    assert schema_errors(loaded(name)) == []


@pytest.mark.parametrize("name", FILES)
def test_parses_with_the_compose_spec_parser(name: str) -> None:
    compose = PyOptions(apply_merge=True).from_yaml(interpolate((COMPOSE / name).read_text(), example_env()))
    compose.validate()
    assert set(compose.service_names()) >= {"daemon", "serve"}


def test_the_validators_reject_bad_files() -> None:
    """Each validator fails on what it is here for, or passing proves nothing."""
    text = interpolate((COMPOSE / "docker-compose.yml").read_text(), example_env())
    assert schema_errors(yaml.safe_load(text.replace("    hostname: kafka\n", "    hostnme: kafka\n")))
    for bad in (
        text.replace("stop_grace_period: 3m", "stop_grace_period: 3 minutes"),
        text.replace("restart: unless-stopped", "restart: sometimes", 1),
    ):
        with pytest.raises(ValueError):
            PyOptions(apply_merge=True).from_yaml(bad).validate()


def test_every_variable_is_in_env_example_and_env_is_ignored() -> None:
    text = (COMPOSE / "docker-compose.yml").read_text()
    required = {m[1] for m in _VARIABLE.finditer(text) if m[2] in (":?", "?")}
    assert required and required <= set(example_env()), sorted(required - set(example_env()))
    with pytest.raises(KeyError, match="CDM_REDIS__PASSWORD"):
        interpolate(text, {k: v for k, v in example_env().items() if k != "CDM_REDIS__PASSWORD"})
    assert ".env" in (COMPOSE / ".gitignore").read_text().split()


# -- the cdm services -----------------------------------------------------------------------------------------


def _config() -> dict[str, Any]:
    return load_toml(COMPOSE / "config.toml")


def test_compose_config_loads_with_the_config_loader() -> None:
    secrets = {k: v for k, v in example_env().items() if k.startswith("CDM_")}
    parse_deploy_config(env_overrides(_config(), secrets))


@pytest.mark.parametrize("name", ["daemon", "serve"])
def test_cdm_services_are_hardened_and_healthchecked(name: str) -> None:
    service = loaded()["services"][name]
    assert service["read_only"] is True and service["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in service["security_opt"]
    assert int(service["user"].split(":")[0]) > 0
    assert any(t.startswith("/tmp") for t in service["tmpfs"])
    assert service["restart"] == "unless-stopped"
    assert service["build"]["dockerfile"] == "deploy/docker/Dockerfile"
    assert (COMPOSE / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
    assert f"./config.toml:{CONFIG_PATH}:ro" in service["volumes"]
    assert service["command"][service["command"].index("--config") + 1] == CONFIG_PATH
    # secrets come from the environment, never from config.toml
    assert {"CDM_REDIS__PASSWORD", "CDM_ARTIFACTS__SECRET_ACCESS_KEY"} <= set(service["environment"])
    keys = {key for values in _config().values() for key in values}
    assert not keys & SECRET_KEYS, f"config.toml holds secrets: {sorted(keys & SECRET_KEYS)}"
    assert "@" not in _config()["redis"]["url"], "no credentials in the Redis url"


def test_daemon_keeps_its_identity_spool_and_warm_shutdown() -> None:
    daemon = loaded()["services"]["daemon"]
    config = _config()["daemon"]
    assert daemon["hostname"]  # the replica identity must not change with the container id
    assert daemon["stop_signal"] == "SIGTERM"
    assert re.fullmatch(r"\d+m", daemon["stop_grace_period"]) and int(daemon["stop_grace_period"][:-1]) >= 2
    named = {v.split(":")[1]: v.split(":")[0] for v in daemon["volumes"] if not v.startswith(".")}
    for key in ("spool_dir", "artifact_dir"):
        mount = next(m for m in named if posixpath.commonpath([m, config[key]]) == m)
        assert named[mount] in loaded()["volumes"], f"[daemon] {key} must be on a named volume"
    port = config["http_port"]
    assert config["http_host"] == "0.0.0.0"
    assert f":{port}/healthz" in " ".join(daemon["healthcheck"]["test"])
    assert daemon["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"


def test_serve_listens_where_it_is_checked_and_scraped() -> None:
    serve = loaded()["services"]["serve"]
    port = serve["command"][serve["command"].index("--port") + 1]
    assert f":{port}/healthz" in " ".join(serve["healthcheck"]["test"])
    assert serve["environment"]["CDM_HEALTHCHECK_URL"].endswith(f":{port}/healthz")
    scrape = {
        job["job_name"]: job for job in yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())["scrape_configs"]
    }
    assert scrape["cdm-serve"]["dns_sd_configs"][0] == {
        **scrape["cdm-serve"]["dns_sd_configs"][0],
        "names": ["serve"],
        "port": int(port),
    }
    daemon_target = scrape["cdm-daemon"]["static_configs"][0]["targets"]
    assert daemon_target == [f"daemon:{_config()['daemon']['http_port']}"]


def test_gpu_override_switches_image_devices_and_reserves_a_gpu() -> None:
    gpu = loaded("docker-compose.gpu.yml")["services"]
    for name in ("daemon", "serve"):
        assert gpu[name]["build"]["target"] == "cuda"
        (device,) = gpu[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        env = gpu[name]["environment"]
        assert {v for k, v in env.items() if k.endswith("__DEVICE")} == {"cuda"}
        parse_deploy_config(env_overrides(_config() | {"artifacts": {}}, env))


# -- the backing services -------------------------------------------------------------------------------------


def test_kafka_is_kraft_and_accepts_the_daemons_largest_record() -> None:
    from daemon.config import KafkaConfig

    kafka = loaded()["services"]["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = kafka["environment"]
    assert "controller" in env["KAFKA_PROCESS_ROLES"] and "KAFKA_ZOOKEEPER_CONNECT" not in env
    max_bytes = _config()["kafka"].get("max_message_bytes", KafkaConfig().max_message_bytes)
    assert int(env["KAFKA_MESSAGE_MAX_BYTES"]) > max_bytes
    assert int(env["KAFKA_REPLICA_FETCH_MAX_BYTES"]) >= int(env["KAFKA_MESSAGE_MAX_BYTES"])
    host, port = _config()["kafka"]["bootstrap_servers"].split(":")
    assert f"//{host}:{port}" in env["KAFKA_ADVERTISED_LISTENERS"]
    assert any(v.endswith(":/var/lib/kafka/data") for v in kafka["volumes"])


def test_redis_persists_and_never_evicts() -> None:
    redis = loaded()["services"]["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command and "--maxmemory-policy noeviction" in command and "--requirepass" in command
    assert any(v.endswith(":/data") for v in redis["volumes"])
    assert _config()["redis"]["url"].startswith("redis://redis:6379/")


def test_minio_bucket_is_the_configured_artifact_store() -> None:
    services = loaded()["services"]
    init = services["minio-init"]
    bucket = init["environment"]["BUCKET"]
    artifacts = _config()["artifacts"]
    assert artifacts["url"].startswith(f"s3://{bucket}/")
    assert artifacts["endpoint_url"] == "http://minio:9000"
    assert init["restart"] == "no" and init["depends_on"]["minio"]["condition"] == "service_healthy"


def test_prometheus_and_grafana_are_provisioned_from_deploy_observability() -> None:
    services = loaded()["services"]
    mounts = {
        v.split(":")[1]: (COMPOSE / v.split(":")[0]).resolve()
        for v in services["prometheus"]["volumes"]
        if v.startswith(".")
    }
    assert mounts["/etc/prometheus"] == PROMETHEUS.resolve()
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]
    grafana = {
        v.split(":")[1]: (COMPOSE / v.split(":")[0]).resolve()
        for v in services["grafana"]["volumes"]
        if v.startswith(".")
    }
    assert grafana["/etc/grafana/provisioning"] == (GRAFANA / "provisioning").resolve()
    (provider,) = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "cdm.yml").read_text())["providers"]
    assert grafana[provider["options"]["path"]] == (GRAFANA / "dashboards").resolve()
    (source,) = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    assert "prometheus" in services


def test_env_example_has_no_real_looking_secret() -> None:
    for key, value in example_env().items():
        if re.search(r"PASSWORD|SECRET", key):
            assert value.startswith("change-me"), f"{key} in .env.example must be a placeholder"


def _volume_sources(path: Path) -> list[str]:
    return [
        v.split(":")[0] for s in yaml.safe_load(path.read_text())["services"].values() for v in s.get("volumes", [])
    ]


def test_bind_mounts_exist() -> None:
    for source in _volume_sources(COMPOSE / "docker-compose.yml"):
        if source.startswith("."):
            assert (COMPOSE / source).exists(), source
