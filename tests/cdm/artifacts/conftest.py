"""Stores for the tests: every backend test runs on a local directory and on the real S3 server (moto)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cdm.artifacts import ArtifactsConfig, ArtifactStore, DirectoryStore, open_store
from tests.conftest import S3_TEST_ACCESS_KEY, S3_TEST_REGION, S3_TEST_SECRET_KEY

BACKENDS = ["file", pytest.param("s3", marks=pytest.mark.services)]


def s3_config(endpoint: str, bucket: str, prefix: str = "artifacts", **overrides: object) -> ArtifactsConfig:
    """``[artifacts]`` for the test S3 server (explicit keys: nothing is read from the environment)."""
    fields: dict[str, object] = {
        "url": f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}",
        "endpoint_url": endpoint,
        "region": S3_TEST_REGION,
        "access_key_id": S3_TEST_ACCESS_KEY,
        "secret_access_key": S3_TEST_SECRET_KEY,
        "request_timeout_s": 10.0,
        "max_retries": 1,
    }
    fields.update(overrides)
    return ArtifactsConfig(**fields)  # type: ignore[arg-type]


@pytest.fixture
def store_config(request: pytest.FixtureRequest, tmp_path: Path) -> ArtifactsConfig:
    """The ``[artifacts]`` section of the backend under test (parametrise ``store_config`` indirectly)."""
    kind = getattr(request, "param", "file")
    if kind == "file":
        return ArtifactsConfig(url=(tmp_path / "store").as_uri())
    return s3_config(request.getfixturevalue("s3_endpoint"), request.getfixturevalue("s3_bucket"))


@pytest.fixture
def store(store_config: ArtifactsConfig) -> ArtifactStore:
    return open_store(store_config, environ={})


@pytest.fixture
def local_store(tmp_path: Path) -> DirectoryStore:
    return DirectoryStore(tmp_path / "store")
