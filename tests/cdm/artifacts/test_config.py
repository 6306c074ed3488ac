"""[artifacts]: range checks that say what to do, backend selection, AWS environment fallbacks."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from cdm.artifacts import ArtifactsConfig, DirectoryStore, open_cache, open_store
from cdm.artifacts.s3 import S3ObjectStore, resolve_settings
from cdm.config import build
from cdm.errors import ConfigError, StoreError


def test_defaults_and_toml_section() -> None:
    assert ArtifactsConfig().scheme == ""
    doc = tomllib.loads(
        """
        [artifacts]
        url = "s3://cdm-artifacts/prod"
        endpoint_url = "http://127.0.0.1:9000"
        access_key_id = "AKIA"
        secret_access_key = "very-secret"
        cache_max_bytes = 104857600
        addressing = "path"
        """
    )
    cfg = build(ArtifactsConfig, doc["artifacts"])
    assert cfg.scheme == "s3" and cfg.cache_max_bytes == 100 * 1024 * 1024
    assert "very-secret" not in repr(cfg) and "AKIA" in repr(cfg)
    with pytest.raises(ConfigError, match="unknown key"):
        build(ArtifactsConfig, {"bucket": "x"})
    with pytest.raises(ConfigError, match="choose one of"):
        build(ArtifactsConfig, {"addressing": "dns"})


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"url": "http://bucket/x"}, "has scheme 'http'"),
        ({"url": "file://relative/dir"}, "file:///absolute/dir"),
        ({"url": "s3://Bad_Bucket/x"}, "not a valid S3 bucket name"),
        ({"url": "s3://ok-bucket/a//b"}, "empty/'..' path segment"),
        ({"url": "s3://ok-bucket/a/../b"}, "empty/'..' path segment"),
        ({"endpoint_url": "127.0.0.1:9000"}, "not an http"),
        ({"access_key_id": "AKIA"}, "must be set together"),
        ({"session_token": "tok"}, "needs artifacts.access_key_id"),
        ({"region": "US East"}, "region name"),
        ({"cache_dir": ""}, "artifacts.cache_dir = '' must not be empty"),
        ({"cache_max_bytes": 1000}, "artifacts.cache_max_bytes = 1000 must be >= 1048576"),
        ({"request_timeout_s": 0.0}, r"artifacts.request_timeout_s = 0.0 must be > 0"),
        ({"max_retries": 99}, r"artifacts.max_retries = 99 must be <= 20"),
    ],
)
def test_bad_values_say_what_to_do(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ArtifactsConfig(**fields)  # type: ignore[arg-type]


def test_settings_come_from_config_then_environment() -> None:
    env = {
        "AWS_ENDPOINT_URL": "http://minio:9000",
        "AWS_DEFAULT_REGION": "eu-west-1",
        "AWS_ACCESS_KEY_ID": "env-key",
        "AWS_SECRET_ACCESS_KEY": "env-secret",
        "AWS_SESSION_TOKEN": "env-token",
    }
    from_env = resolve_settings(ArtifactsConfig(url="s3://b-1/p"), env)
    assert (from_env.endpoint_url, from_env.region, from_env.access_key_id, from_env.session_token) == (
        "http://minio:9000",
        "eu-west-1",
        "env-key",
        "env-token",
    )
    assert not from_env.virtual_hosted  # an endpoint means MinIO/Ceph/moto: path-style
    assert "env-secret" not in repr(from_env)
    cfg = ArtifactsConfig(url="s3://b-1/p", region="us-west-2", access_key_id="cfg-key", secret_access_key="cfg-s")
    explicit = resolve_settings(cfg, env)
    # config keys win, and the environment's session token does not leak into them
    assert (explicit.region, explicit.access_key_id, explicit.session_token) == ("us-west-2", "cfg-key", "")
    aws = resolve_settings(ArtifactsConfig(url="s3://b-1/p"), {})
    assert (aws.endpoint_url, aws.region, aws.virtual_hosted, aws.access_key_id) == ("", "us-east-1", True, "")
    assert resolve_settings(ArtifactsConfig(url="s3://b-1", addressing="path"), {}).virtual_hosted is False
    with pytest.raises(StoreError, match="set together"):
        resolve_settings(ArtifactsConfig(url="s3://b-1"), {"AWS_ACCESS_KEY_ID": "only-key"})


def test_open_store_and_cache_pick_backend_and_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    local = open_store(ArtifactsConfig(url=(tmp_path / "a").as_uri()))
    assert isinstance(local, DirectoryStore) and local.root == tmp_path / "a"
    fallback = open_store(ArtifactsConfig(), default_dir=tmp_path / "daemon-artifacts")
    assert isinstance(fallback, DirectoryStore) and fallback.root == tmp_path / "daemon-artifacts"
    with pytest.raises(ConfigError, match="set \\[artifacts\\] url"):
        open_store(ArtifactsConfig())
    s3 = open_store(ArtifactsConfig(url="s3://cdm-bucket/deep/prefix/", endpoint_url="http://127.0.0.1:1"), environ={})
    assert isinstance(s3, S3ObjectStore) and s3.root_url == "s3://cdm-bucket/deep/prefix"
    assert s3.url("a/b") == "s3://cdm-bucket/deep/prefix/a/b" and s3.key_of("s3://cdm-bucket/deep/prefix/a/b") == "a/b"
    monkeypatch.chdir(tmp_path)
    cache = open_cache(ArtifactsConfig(cache_dir="rel/cache"), local)
    assert cache.root == (tmp_path / "rel" / "cache").resolve()
    elsewhere = open_cache(ArtifactsConfig(cache_dir="rel/cache"), local, base_dir=tmp_path / "x")
    assert elsewhere.root == (tmp_path / "x" / "rel" / "cache").resolve()
