"""``[redis]``: the registry's Redis server, typed and range-checked (read by ``daemon.config``).

Errors are ``RegistryConfigError`` (the daemon's loader reports them as ``cdm.errors.ConfigError``).
"""

from __future__ import annotations

import urllib.parse
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, model_validator

from common.settings import section
from registry.errors import RegistryConfigError

SslCertReqs = Literal["required", "optional", "none"]


def _check_url(url: str) -> str:
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("must start with redis://, rediss:// or unix://")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"is not a URL redis-py reads ({exc}); use redis://[user:pass@]host:port/db") from None
    if not url.startswith("unix://") and not parts.hostname:
        raise ValueError("has no host; use redis://[user:pass@]host:port/db")
    if port == 0:
        raise ValueError("has port 0; use a port in 1..65535")
    return url


def _check_namespace(namespace: str) -> str:
    if not 1 <= len(namespace) <= 64 or any(c in namespace for c in " \t\r\n{}*?[]"):
        raise ValueError("must be 1-64 characters without spaces, braces or glob characters (*?[]), e.g. 'cdm'")
    return namespace


@section("redis", error=RegistryConfigError)
class RedisConfig:
    """``[redis]``: the registry's Redis server."""

    # redis://[user:pass@]host:port/db, rediss:// for TLS, unix://; credentials in it are never logged
    url: Annotated[str, AfterValidator(_check_url)] = "redis://127.0.0.1:6379/0"
    username: Annotated[str, Field(min_length=1)] | None = None  # ACL user (overrides the url's)
    password: str | None = Field(default=None, repr=False)  # overrides the url's
    tls: bool = False  # connect with TLS (same as a rediss:// url)
    tls_ca_certs: Annotated[str, Field(min_length=1)] | None = None  # CA bundle (PEM) to verify the server
    tls_certfile: Annotated[str, Field(min_length=1)] | None = None  # client certificate (PEM) for mutual TLS
    tls_keyfile: Annotated[str, Field(min_length=1)] | None = None  # client private key (PEM)
    tls_cert_reqs: SslCertReqs = "required"  # server certificate verification
    # prefix of every key and channel (registry/keys.py): 1-64 characters, no spaces, braces or glob characters
    namespace: Annotated[str, AfterValidator(_check_namespace)] = "cdm"
    socket_timeout_s: Annotated[float, Field(gt=0, le=3600)] = 5.0  # per command
    socket_connect_timeout_s: Annotated[float, Field(gt=0, le=3600)] = 5.0
    health_check_interval_s: Annotated[int, Field(ge=0, le=3600)] = 30  # PING idle connections before reuse (0 = never)

    @model_validator(mode="after")
    def _check(self) -> RedisConfig:
        tls_files = ("tls_ca_certs", "tls_certfile", "tls_keyfile")
        given = [f"redis.{name}" for name in tls_files if getattr(self, name) is not None]
        if given and not self.uses_tls:
            raise ValueError(f"{', '.join(given)} set but TLS is off; set redis.tls = true or use a rediss:// url")
        if (self.tls_certfile is None) != (self.tls_keyfile is None):
            raise ValueError("redis.tls_certfile and redis.tls_keyfile must be given together (mutual TLS)")
        return self

    @property
    def uses_tls(self) -> bool:
        return self.tls or self.url.startswith("rediss://")

    def client_kwargs(self) -> dict[str, Any]:
        """``redis.Redis.from_url(**cfg.client_kwargs())`` (the url is included; TLS keys only when on).

        ``registry.client.connect`` is the one place that builds clients from it.
        """
        url = self.url
        if self.tls and url.startswith("redis://"):
            url = "rediss://" + url[len("redis://") :]
        kwargs: dict[str, Any] = {
            "url": url,
            "socket_timeout": self.socket_timeout_s,
            "socket_connect_timeout": self.socket_connect_timeout_s,
            "health_check_interval": self.health_check_interval_s,
        }
        if self.username is not None:
            kwargs["username"] = self.username
        if self.password is not None:
            kwargs["password"] = self.password
        if self.uses_tls:
            kwargs["ssl_cert_reqs"] = self.tls_cert_reqs
            for key, value in (
                ("ssl_ca_certs", self.tls_ca_certs),
                ("ssl_certfile", self.tls_certfile),
                ("ssl_keyfile", self.tls_keyfile),
            ):
                if value is not None:
                    kwargs[key] = value
        return kwargs
