"""``[redis]``: the registry's Redis server, typed and range-checked (read by ``daemon.config``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from registry.errors import RegistryConfigError

SslCertReqs = Literal["required", "optional", "none"]


@dataclass(frozen=True)
class RedisConfig:
    """``[redis]``: the registry's Redis server."""

    url: str = "redis://127.0.0.1:6379/0"  # redis://[user:pass@]host:port/db, rediss:// for TLS, unix://
    username: str | None = None  # ACL user (overrides the url's)
    password: str | None = field(default=None, repr=False)  # overrides the url's
    tls: bool = False  # connect with TLS (same as a rediss:// url)
    tls_ca_certs: str | None = None  # CA bundle (PEM) to verify the server
    tls_certfile: str | None = None  # client certificate (PEM) for mutual TLS
    tls_keyfile: str | None = None  # client private key (PEM)
    tls_cert_reqs: SslCertReqs = "required"  # server certificate verification
    namespace: str = "cdm"  # prefix of every key and channel (registry/keys.py)
    socket_timeout_s: float = 5.0  # per command
    socket_connect_timeout_s: float = 5.0
    health_check_interval_s: int = 30  # PING idle connections before reuse (0 = never)

    def __post_init__(self) -> None:
        if not self.url.startswith(("redis://", "rediss://", "unix://")):
            raise RegistryConfigError(f"redis.url = {self.url!r} must start with redis://, rediss:// or unix://")
        if not self.namespace or any(c in self.namespace for c in " {}*?[]"):
            raise RegistryConfigError(
                f"redis.namespace = {self.namespace!r} must be non-empty, without spaces, braces or glob characters"
            )
        for name, value in (
            ("socket_timeout_s", self.socket_timeout_s),
            ("socket_connect_timeout_s", self.socket_connect_timeout_s),
        ):
            if value <= 0:
                raise RegistryConfigError(f"redis.{name} = {value!r} must be > 0")
        if self.health_check_interval_s < 0:
            raise RegistryConfigError(f"redis.health_check_interval_s = {self.health_check_interval_s} must be >= 0")
        tls_files = (self.tls_ca_certs, self.tls_certfile, self.tls_keyfile)
        if any(f is not None for f in tls_files) and not self.uses_tls:
            raise RegistryConfigError(
                "redis.tls_* files are set but TLS is off; set redis.tls = true or use rediss://"
            )

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
