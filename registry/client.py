"""The one place that builds redis-py clients (the daemon, samplers, the CLI and the demo all call ``connect``)."""

from __future__ import annotations

import redis

from registry.config import RedisConfig


def connect(cfg: RedisConfig, *, url: str | None = None) -> redis.Redis:
    """A client for ``cfg`` (timeouts, credentials, TLS); ``url`` replaces ``cfg.url`` when given.

    Nothing is contacted until the first command; the caller owns the client and closes it.
    """
    kwargs = cfg.client_kwargs()
    default_url = kwargs.pop("url")
    return redis.Redis.from_url(url or default_url, **kwargs)
