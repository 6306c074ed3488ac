"""registry/config.py and registry/client.py: the [redis] section and the one client factory."""

from __future__ import annotations

import pytest
import redis

from registry.client import connect
from registry.config import RedisConfig
from registry.errors import RegistryConfigError


def test_redis_client_kwargs_plain() -> None:
    kw = RedisConfig(url="redis://127.0.0.1:1/3").client_kwargs()
    assert kw["url"] == "redis://127.0.0.1:1/3"
    assert not any(k.startswith("ssl") for k in kw) and "password" not in kw
    client = redis.Redis.from_url(**kw)  # connects lazily: nothing is contacted here
    conn = client.connection_pool.make_connection()
    assert type(conn) is redis.Connection and conn.db == 3
    client.close()


def test_redis_client_kwargs_tls_and_password() -> None:
    cfg = RedisConfig(url="redis://h:6379/0", tls=True, tls_ca_certs="/ca.pem", password="s3cret", username="u")
    kw = cfg.client_kwargs()
    assert kw["url"].startswith("rediss://")
    assert kw["ssl_ca_certs"] == "/ca.pem" and kw["ssl_cert_reqs"] == "required"
    assert (kw["username"], kw["password"]) == ("u", "s3cret")
    client = redis.Redis.from_url(**kw)
    conn = client.connection_pool.make_connection()
    assert isinstance(conn, redis.SSLConnection)
    client.close()
    assert "s3cret" not in repr(cfg)
    with pytest.raises(RegistryConfigError, match="TLS is off"):
        RedisConfig(tls_ca_certs="/ca.pem")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"url": "http://x"}, "redis://"),
        ({"namespace": "a b"}, "namespace"),
        ({"socket_timeout_s": 0}, "socket_timeout_s"),
        ({"health_check_interval_s": -1}, "health_check_interval_s"),
    ],
)
def test_invalid_values_are_named(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(RegistryConfigError, match=match):
        RedisConfig(**kwargs)  # type: ignore[arg-type]


def test_connect_applies_the_config_and_the_url_override() -> None:
    cfg = RedisConfig(url="redis://127.0.0.1:1/3", socket_timeout_s=2.5, password="pw")
    client = connect(cfg)  # connects lazily: nothing is contacted here
    conn = client.connection_pool.make_connection()
    assert (conn.db, conn.port, conn.password, conn.socket_timeout) == (3, 1, "pw", 2.5)
    client.close()
    other = connect(cfg, url="redis://127.0.0.1:2/5")
    conn = other.connection_pool.make_connection()
    assert (conn.db, conn.port, conn.password, conn.socket_timeout) == (5, 2, "pw", 2.5)
    other.close()
    tls = connect(RedisConfig(url="redis://h:1/0", tls=True))
    assert isinstance(tls.connection_pool.make_connection(), redis.SSLConnection)
    tls.close()
