"""Config on pydantic: every field's range, refusals naming the key, the source order and the environment.

* a property test: random values for every key of every section either load (and then satisfy the key's
  declared range) or raise ConfigError naming the key, never another exception and never a secret's value;
* the ranges a demanding user expects, key by key;
* sources in order: defaults <- config.toml <- services.json <- CDM_<SECTION>__<KEY> <- CLI flags.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdm.config import TrainConfig, replace
from cdm.errors import ConfigError
from common.settings import secret_fields
from daemon.config import SECTIONS, AppConfig, load_config, parse_config

FIELDS = [(name, f.name) for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)]
SECRETS = {(name, key) for name, cls in SECTIONS.items() for key in secret_fields(cls)}


def constraints(section: str, key: str) -> dict[str, Any]:
    """The ge/gt/le/lt bounds declared on a field (pydantic metadata)."""
    info = SECTIONS[section].__pydantic_fields__[key]
    out: dict[str, Any] = {}
    for meta in info.metadata:
        for bound in ("ge", "gt", "le", "lt"):
            if getattr(meta, bound, None) is not None:
                out[bound] = getattr(meta, bound)
    return out


values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=-3, max_value=70_000),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.sampled_from(
        [
            "cpu",
            "cuda",
            "cosine",
            "dpm",
            "top_k",
            "PLAINTEXT",
            "SASL_SSL",
            "redis://u:pw@h:1/0",
            "s3://bucket-1/p",
            "file:///tmp/x",
            "127.0.0.1:9092",
            "",
            "squaredcos_cap_v2",
        ]
    ),
    st.lists(st.integers(min_value=-5, max_value=5000), max_size=8),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


def error_of(doc: dict[str, dict[str, Any]]) -> str:
    """The ConfigError message of loading ``doc`` ("" when it loads)."""
    try:
        parse_config(doc)
    except ConfigError as exc:
        return str(exc)
    return ""


def check_outcome(doc: dict[str, dict[str, Any]]) -> None:
    """Load ``doc``; on success every given value is kept and within its range, else the error names a key."""
    try:
        cfg = parse_config(doc)
    except ConfigError as exc:
        message = str(exc)
        named = [f"{s}.{k}" for s, table in doc.items() for k in table] + [f"[{s}]" for s in doc]
        assert any(n in message for n in named), (doc, message)
        assert "validation error" not in message and "pydantic" not in message, message  # no raw pydantic dump
        for s, k in SECRETS:
            secret = doc.get(s, {}).get(k)
            others = " ".join(repr(v) for ss, t in doc.items() for kk, v in t.items() if (ss, kk) != (s, k))
            if isinstance(secret, str | int) and len(str(secret)) >= 4 and str(secret) not in others:
                # a leak is text that comes from the secret: the same document with another secret of the same
                # length must not show it too (a secret "cuda" is also a word of "choose 'cpu' or 'cuda'")
                swapped = {ss: {**t, k: "#" * len(str(secret))} if ss == s else t for ss, t in doc.items()}
                assert str(secret) not in message or str(secret) in error_of(swapped), (s, k, message)
        return
    for section, table in doc.items():
        obj = getattr(cfg.library, section) if hasattr(cfg.library, section) else getattr(cfg, section)
        for key, value in table.items():
            got = getattr(obj, key)
            expected = tuple(value) if isinstance(value, list) else value
            assert got == expected, (section, key, value, got)
            if isinstance(got, int | float) and not isinstance(got, bool):
                assert math.isfinite(got)
                c = constraints(section, key)
                assert got >= c.get("ge", -math.inf) and got <= c.get("le", math.inf), (section, key, got, c)
                assert got > c.get("gt", -math.inf) and got < c.get("lt", math.inf), (section, key, got, c)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(FIELDS), values)
def test_any_value_of_any_key_loads_or_is_refused_by_name(field: tuple[str, str], value: Any) -> None:
    section, key = field
    check_outcome({section: {key: value}})


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(FIELDS), values), min_size=1, max_size=6))
def test_random_tables_load_or_are_refused_by_name(items: list[tuple[tuple[str, str], Any]]) -> None:
    doc: dict[str, dict[str, Any]] = {}
    for (section, key), value in items:
        doc.setdefault(section, {})[key] = value
    check_outcome(doc)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(sorted(SECTIONS)), st.from_regex(r"[a-z_]{1,20}", fullmatch=True), st.integers())
def test_unknown_keys_are_refused_by_name_with_the_allowed_ones(section: str, key: str, value: int) -> None:
    allowed = {f.name for f in dataclasses.fields(SECTIONS[section])}
    if key in allowed:
        return
    with pytest.raises(ConfigError) as err:
        parse_config({section: {key: value}})
    message = str(err.value)
    assert f"unknown key(s) in [{section}]: {key}" in message
    assert all(name in message for name in allowed)


# -- ranges, key by key ---------------------------------------------------------------------------------------

RANGES = [
    ("train", "steps", -5, "train.steps = -5 must be >= 1"),
    ("train", "steps", 0, "train.steps = 0 must be >= 1"),
    ("train", "batch_size", 0, "train.batch_size = 0 must be >= 1"),
    ("train", "label_dropout", 3.0, "train.label_dropout = 3.0 must be <= 1"),
    ("train", "label_dropout", -0.1, "train.label_dropout = -0.1 must be >= 0"),
    ("train", "lr", 0.0, "train.lr = 0.0 must be > 0"),
    ("train", "lr", -1e-3, "train.lr = -0.001 must be > 0"),
    ("train", "ema_decay", 1.0, "train.ema_decay = 1.0 must be < 1"),
    ("train", "ema_decay", -0.5, "train.ema_decay = -0.5 must be >= 0"),
    ("train", "lr", float("nan"), "train.lr = nan must be a finite number"),
    ("train", "threads", -1, "train.threads = -1 must be >= 0"),
    ("train", "grad_clip", -1.0, "train.grad_clip = -1.0 must be >= 0"),
    ("train", "seed", -1, "train.seed = -1 must be >= 0"),
    ("train", "checkpoint_every", -1, "train.checkpoint_every = -1 must be >= 0"),
    ("router", "steps", 0, "router.steps = 0 must be >= 1"),
    ("router", "channels", [], "router.channels = [] must have at least 1 item"),
    ("router", "channels", [32, 0], "router.channels[1] = 0 must be >= 1"),
    ("router", "label_dropout", 1.5, "router.label_dropout = 1.5 must be <= 1"),
    ("sample", "top_k", 0, "sample.top_k = 0 must be >= 1"),
    ("sample", "num_inference_steps", 0, "sample.num_inference_steps = 0 must be >= 1"),
    ("sample", "num_inference_steps", 5000, "sample.num_inference_steps = 5000 must be <= model.num_train_timesteps"),
    ("sample", "batch_size", 0, "sample.batch_size = 0 must be >= 1"),
    ("model", "in_channels", 2, "model.in_channels = 2 must be 1 (grayscale) or 3 (RGB)"),
    ("model", "in_channels", True, "model.in_channels = True must be an integer"),
    ("model", "norm_num_groups", 5, "model.norm_num_groups = 5 must divide every width"),
    ("model", "sample_size", 17, "model.sample_size = 17 must be divisible by 2"),
    ("model", "beta_schedule", "cosine", "model.beta_schedule = 'cosine' is not allowed; choose one of"),
    ("eval", "memorisation_ratio", 0.0, "eval.memorisation_ratio = 0.0 must be > 0"),
    ("eval", "memorisation_ratio", 1.5, "eval.memorisation_ratio = 1.5 must be <= 1"),
    ("eval", "num_samples", 1, "eval.num_samples = 1 must be >= 2"),
    ("daemon", "http_port", -1, "daemon.http_port = -1 must be >= 0"),
    ("daemon", "http_port", 65536, "daemon.http_port = 65536 must be <= 65535"),
    ("daemon", "http_read_timeout_s", 0, "daemon.http_read_timeout_s = 0 must be > 0"),
    ("daemon", "http_max_connections", 0, "daemon.http_max_connections = 0 must be >= 8"),
    ("daemon", "readiness_refresh_s", 0, "daemon.readiness_refresh_s = 0 must be > 0"),
    ("daemon", "lock_ttl_s", 0, "daemon.lock_ttl_s = 0 must be > 0"),
    ("daemon", "poll_timeout_ms", 0, "daemon.poll_timeout_ms = 0 must be >= 1"),
    ("daemon", "gc_grace_s", -1, "daemon.gc_grace_s = -1 must be >= 0"),
    ("daemon", "spool_dir", "", "daemon.spool_dir = '' must not be empty"),
    ("daemon", "daemon_id", "a b", "daemon.daemon_id = 'a b' must be empty"),
    ("scheduler", "gc_s", 0, "scheduler.gc_s = 0 must be > 0"),
    ("scheduler", "misfire_grace_s", 0.5, "scheduler.misfire_grace_s = 0.5 must be >= 1"),
    ("kafka", "partitions", 0, "kafka.partitions = 0 must be >= 1"),
    ("kafka", "session_timeout_ms", 0, "kafka.session_timeout_ms = 0 must be >= 1000"),
    ("kafka", "bootstrap_servers", "kafka", "kafka.bootstrap_servers = 'kafka' has 'kafka', which is not host:port"),
    ("kafka", "bootstrap_servers", "h:0", "not host:port (port 1..65535)"),
    ("kafka", "dlq_topic", "cdm.sources", "the three topics must differ"),
    ("kafka", "sources_topic", "a b", "kafka.sources_topic = 'a b' is not a Kafka topic name"),
    ("redis", "socket_timeout_s", 0, "redis.socket_timeout_s = 0 must be > 0"),
    ("redis", "health_check_interval_s", -1, "redis.health_check_interval_s = -1 must be >= 0"),
    ("redis", "url", "redis://h:99999/0", "redis.url = 'redis://h:99999/0' is not a URL redis-py reads"),
    ("artifacts", "max_retries", 21, "artifacts.max_retries = 21 must be <= 20"),
    ("artifacts", "cache_max_bytes", 1, "artifacts.cache_max_bytes = 1 must be >= 1048576"),
]


@pytest.mark.parametrize(("section", "key", "value", "message"), RANGES, ids=[f"{r[0]}.{r[1]}" for r in RANGES])
def test_ranges(section: str, key: str, value: Any, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({section: {key: value}})
    assert message in str(err.value)


def test_every_numeric_key_has_a_range() -> None:
    """No number is accepted unbounded: each int/float field declares a lower and an upper bound."""
    unbounded = []
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            info = cls.__pydantic_fields__[f.name]
            if info.annotation in (int, float) and f.name not in ("in_channels",):
                c = constraints(section, f.name)
                if not ({"ge", "gt"} & set(c) and {"le", "lt"} & set(c)):
                    unbounded.append(f"{section}.{f.name}")
    assert not unbounded, unbounded


def test_errors_list_every_problem_and_name_secrets_without_their_value() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"train": {"steps": -5, "batch_size": 0, "stepz": 1}})
    message = str(err.value)
    assert "train.steps = -5 must be >= 1" in message and "train.batch_size = 0 must be >= 1" in message
    assert "unknown key(s) in [train]: stepz" in message and "did you mean steps?" in message
    with pytest.raises(ConfigError) as err:
        parse_config({"redis": {"password": 123456789}})
    assert "redis.password = *** must be a string" in str(err.value) and "123456789" not in str(err.value)
    with pytest.raises(ConfigError) as err:
        parse_config({"redis": {"url": "http://user:hunter22@host/0"}})
    assert "hunter22" not in str(err.value) and "http://user:***@host/0" in str(err.value)


def test_a_huge_value_is_quoted_bounded() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"daemon": {"spool_dir": "x" * 1_000_000, "http_port": "y" * 10**6}})
    assert len(str(err.value)) < 1000 and "1000002 chars" in str(err.value)


def test_cli_overrides_are_validated_and_none_keeps_the_value() -> None:
    base = TrainConfig()
    assert replace(base, steps=None, seed=3) == dataclasses.replace(base, seed=3)
    with pytest.raises(ConfigError, match=r"train\.steps = 0 must be >= 1"):
        replace(base, steps=0)
    with pytest.raises(ConfigError, match=r"train\.batch_size = -2 must be >= 1"):
        dataclasses.replace(base, batch_size=-2)


# -- sources and their order ----------------------------------------------------------------------------------


def test_sources_in_order(tmp_path: Path) -> None:
    """defaults <- file <- services.json <- environment; each value says where it came from when refused."""
    path = tmp_path / "config.toml"
    path.write_text('[train]\nsteps = 7\nbatch_size = 9\n[redis]\nurl = "redis://file:1/0"\nnamespace = "file"\n')
    services = tmp_path / "services.json"
    services.write_text(json.dumps({"redis_url": "redis://services:2/0", "kafka_bootstrap": "svc:9"}))
    env = {"CDM_TRAIN__STEPS": "11", "CDM_REDIS__NAMESPACE": "env", "CDM_IMAGE": "cdm:gpu", "PATH": "/bin"}

    assert load_config(None, environ={}) == AppConfig()
    cfg = load_config(path, environ={})
    assert (cfg.library.train.steps, cfg.library.train.batch_size, cfg.library.train.lr) == (7, 9, 2e-3)
    cfg = load_config(path, environ={}, services=services)
    assert (cfg.redis.url, cfg.redis.namespace) == ("redis://services:2/0", "file")
    assert cfg.kafka.bootstrap_servers == "svc:9"
    cfg = load_config(path, environ=env, services=services)
    assert (cfg.library.train.steps, cfg.library.train.batch_size) == (11, 9)  # env over file, file over defaults
    assert (cfg.redis.url, cfg.redis.namespace) == ("redis://services:2/0", "env")
    assert replace(cfg.library.train, steps=13).steps == 13  # CLI flags last

    with pytest.raises(ConfigError, match=r"train.steps = -1 \(from CDM_TRAIN__STEPS\) must be >= 1"):
        load_config(path, environ={"CDM_TRAIN__STEPS": "-1"})
    path.write_text("[train]\nsteps = -2\n")
    with pytest.raises(ConfigError, match=r"train.steps = -2 \(from config.toml\) must be >= 1"):
        load_config(path, environ={})


@pytest.mark.parametrize(
    ("var", "raw", "section", "key", "expected"),
    [
        ("CDM_TRAIN__DEVICE", "cuda", "train", "device", "cuda"),
        ("CDM_TRAIN__STEPS", "300", "train", "steps", 300),
        ("CDM_TRAIN__LR", "1e-4", "train", "lr", 1e-4),
        ("CDM_TRAIN__LR", "1", "train", "lr", 1.0),
        ("CDM_TRAIN__EMA_WARMUP", "false", "train", "ema_warmup", False),
        ("CDM_ROUTER__CHANNELS", "[8, 16, 32]", "router", "channels", (8, 16, 32)),
        ("CDM_REDIS__PASSWORD", "123", "redis", "password", "123"),  # string keys are literal: no quoting
        ("CDM_REDIS__PASSWORD", '"quoted"', "redis", "password", '"quoted"'),
        ("CDM_REDIS__PASSWORD", "p@ss:w#rd [x]", "redis", "password", "p@ss:w#rd [x]"),
        ("CDM_ARTIFACTS__SECRET_ACCESS_KEY", "s3cr3t", "artifacts", "secret_access_key", "s3cr3t"),
        ("CDM_KAFKA__SASL_MECHANISM", "", "kafka", "sasl_mechanism", None),  # empty unsets an optional key
        ("CDM_DAEMON__CLAIM_CHECK_DIR", "/data/claims", "daemon", "claim_check_dir", "/data/claims"),
    ],
)
def test_environment_values_are_parsed_per_key(var: str, raw: str, section: str, key: str, expected: Any) -> None:
    env = {var: raw}
    if section == "artifacts":
        env["CDM_ARTIFACTS__ACCESS_KEY_ID"] = "AKIA"
    cfg = load_config(None, environ=env)
    obj = getattr(cfg.library, section) if hasattr(cfg.library, section) else getattr(cfg, section)
    assert getattr(obj, key) == expected


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"CDM_TRAN__STEPS": "1"}, r"CDM_TRAN__STEPS: there is no section \[tran\]; sections: artifacts, daemon"),
        ({"CDM_TRAIN__STEP": "1"}, r"CDM_TRAIN__STEP: \[train\] has no key 'step'.*did you mean CDM_TRAIN__STEPS\?"),
        ({"CDM_TRAIN__STEPS": "many"}, r"train.steps = 'many' \(from CDM_TRAIN__STEPS\) must be an integer"),
        ({"CDM_TRAIN__STEPS": "1\nlr = 5"}, r"train.steps = '1\\nlr = 5' \(from CDM_TRAIN__STEPS\) must be an integer"),
        ({"CDM_ROUTER__CHANNELS": "[8, -1]"}, r"router.channels\[1\] = -1 \(from CDM_ROUTER__CHANNELS\) must be >= 1"),
    ],
)
def test_environment_errors_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, environ=env)


def test_secrets_from_the_environment_stay_out_of_repr_and_to_dict() -> None:
    env = {
        "CDM_REDIS__PASSWORD": "redis-hunter2",
        "CDM_REDIS__URL": "redis://admin:url-hunter2@r:6379/0",
        "CDM_KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
        "CDM_KAFKA__SASL_MECHANISM": "PLAIN",
        "CDM_KAFKA__SASL_PLAIN_USERNAME": "cdm",
        "CDM_KAFKA__SASL_PLAIN_PASSWORD": "kafka-hunter2",
        "CDM_ARTIFACTS__ACCESS_KEY_ID": "AKIAEXAMPLE",
        "CDM_ARTIFACTS__SECRET_ACCESS_KEY": "s3-hunter2",
        "CDM_ARTIFACTS__SESSION_TOKEN": "token-hunter2",
    }
    cfg = load_config(None, environ=env)
    assert cfg.redis.password == "redis-hunter2" and cfg.artifacts.secret_access_key == "s3-hunter2"
    for text in (repr(cfg), str(cfg), json.dumps(cfg.to_dict()), repr(cfg.redis), repr(cfg.kafka), repr(cfg.artifacts)):
        assert not re.search(r"hunter2", text), text
    assert cfg.to_dict()["redis"]["url"] == "redis://admin:***@r:6379/0"
    assert cfg.to_dict(redact=False)["kafka"]["sasl_plain_password"] == "kafka-hunter2"
