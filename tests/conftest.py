"""Shared fixtures. Service tests run against the real redis-server, Tansu broker and moto S3 server of
deploy/local/services.py.

* ``services`` (session): started on first use in a temporary state dir and stopped at the end of the session,
  so a run that selects no service test starts nothing. Set ``CDM_TEST_SERVICES_DIR=DIR`` to reuse services
  kept running in DIR (``python -m deploy.local.services start --state-dir DIR``); they are then left running.
* ``redis_client`` gives each test its own logical database (leased from 1..15, flushed before and after), and
  ``redis_namespace`` a unique key prefix for pub/sub channels, which Redis does not separate per database.
* ``unique_topic(prefix)`` makes topic names no other test uses (Tansu keeps every topic until it stops).
* ``s3_endpoint`` is the S3 server's endpoint_url (path-style, any credentials: use ``S3_TEST_ACCESS_KEY`` /
  ``S3_TEST_SECRET_KEY``); ``s3_bucket`` is a bucket of this test alone, created empty, emptied and deleted after.

Any test that requests ``services`` (directly or through these fixtures) is marked ``services`` automatically,
so ``pytest -m "not services"`` runs without Redis, Kafka or S3. This file does not import torch on purpose.
"""

from __future__ import annotations

import os
import re
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from deploy.local.services import ServiceAddresses, start, stop

REUSE_ENV = "CDM_TEST_SERVICES_DIR"
_LEASE_KEY = "cdm-test:db-lease:{}"  # in database 0: which test holds database n
_LEASE_TTL_S = 3600  # a crashed session's leases expire eventually
_DATABASES = range(1, 16)  # redis-server's default 16 databases, 0 kept for the leases
S3_TEST_ACCESS_KEY = "testing"  # moto accepts any key pair; these make the signed requests real anyway
S3_TEST_SECRET_KEY = "testing"
S3_TEST_REGION = "us-east-1"


def pytest_configure(config: pytest.Config) -> None:
    # kafka-python 3 loads its protocol schemas with importlib.resources.open_text at import time; the
    # DeprecationWarning is attributed to importlib (not kafka.*), so pyproject's kafka filter misses it.
    config.addinivalue_line("filterwarnings", "ignore:open_text is deprecated:DeprecationWarning")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "services" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.services)


@pytest.fixture(scope="session")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceAddresses]:
    """Redis and the Kafka-protocol broker, for the whole session."""
    reuse = os.environ.get(REUSE_ENV)
    if reuse:
        yield start(reuse)
        return
    state = tmp_path_factory.mktemp("services")
    addresses = start(state)
    try:
        yield addresses
    finally:
        stop(state)


@pytest.fixture(scope="session")
def redis_url(services: ServiceAddresses) -> str:
    """URL of the test Redis server (database 0: do not write there, use ``redis_client``)."""
    return services.redis_url


@pytest.fixture(scope="session")
def kafka_bootstrap(services: ServiceAddresses) -> str:
    """bootstrap_servers of the test broker."""
    return services.kafka_bootstrap


@pytest.fixture
def redis_db_url(redis_url: str) -> Iterator[str]:
    """URL of a logical database leased to this test alone, empty at start and flushed afterwards."""
    admin = redis.Redis.from_url(redis_url)
    token = uuid.uuid4().hex
    deadline = time.monotonic() + 30
    db = None
    while db is None:
        db = next((n for n in _DATABASES if admin.set(_LEASE_KEY.format(n), token, nx=True, ex=_LEASE_TTL_S)), None)
        if db is None:
            if time.monotonic() > deadline:
                pytest.fail("all 15 Redis test databases stay leased; stale leases expire after an hour")
            time.sleep(0.05)
    url = urllib.parse.urlsplit(redis_url)._replace(path=f"/{db}").geturl()
    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
        yield url
    finally:
        client.flushdb()
        client.close()
        if admin.get(_LEASE_KEY.format(db)) == token.encode():
            admin.delete(_LEASE_KEY.format(db))
        admin.close()


@pytest.fixture
def redis_client(redis_db_url: str) -> Iterator[redis.Redis]:
    """A redis-py client (bytes replies) on this test's own, empty logical database."""
    client = redis.Redis.from_url(redis_db_url)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def redis_namespace() -> str:
    """A key / channel prefix no other test uses (pub/sub channels are shared by all databases)."""
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def unique_topic(request: pytest.FixtureRequest) -> Callable[[str], str]:
    """``unique_topic("cdm.sources")`` -> "cdm.sources.<test name>.<random>" (valid Kafka topic name)."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", request.node.name)[:80]

    def make(prefix: str = "t") -> str:
        return f"{prefix}.{base}.{uuid.uuid4().hex[:8]}"

    return make


@pytest.fixture(scope="session")
def s3_endpoint(services: ServiceAddresses) -> str:
    """endpoint_url of the test S3 server (http://127.0.0.1:PORT)."""
    return services.s3_endpoint


@pytest.fixture(scope="session")
def s3_admin(s3_endpoint: str) -> Any:
    """A boto3 S3 client on the test server, for bucket set-up and for tampering with objects behind a store."""
    import boto3  # imported here: a run that selects no S3 test does not pay for it

    return boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        region_name=S3_TEST_REGION,
        aws_access_key_id=S3_TEST_ACCESS_KEY,
        aws_secret_access_key=S3_TEST_SECRET_KEY,
    )


@pytest.fixture
def s3_bucket(s3_admin: Any) -> Iterator[str]:
    """A bucket no other test uses: created empty, then emptied (objects and unfinished uploads) and deleted."""
    name = f"cdm-test-{uuid.uuid4().hex[:20]}"
    s3_admin.create_bucket(Bucket=name)
    try:
        yield name
    finally:
        for page in s3_admin.get_paginator("list_objects_v2").paginate(Bucket=name):
            keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
            if keys:
                s3_admin.delete_objects(Bucket=name, Delete={"Objects": keys, "Quiet": True})
        for upload in s3_admin.list_multipart_uploads(Bucket=name).get("Uploads", []):
            s3_admin.abort_multipart_upload(Bucket=name, Key=upload["Key"], UploadId=upload["UploadId"])
        s3_admin.delete_bucket(Bucket=name)


@pytest.fixture(autouse=True)
def _torch_threads_kept() -> Iterator[None]:
    """torch's intra-op thread count is process-wide, and ``[train]/[router]/[sample] threads`` set it: a test that
    trains with ``threads = 1`` must not leave it so for the tests after it (a result compared bit for bit with
    another process's depends on it)."""
    import torch

    before = torch.get_num_threads()
    yield
    if torch.get_num_threads() != before:
        torch.set_num_threads(before)
