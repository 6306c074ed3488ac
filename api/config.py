"""``[serve]``: the ``cdm serve`` HTTP sampler, typed and range-checked (read by ``daemon.config`` into AppConfig).

Sampling defaults (scheduler, steps, device, vectorisation) come from ``[sample]``; the registry from ``[redis]``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cdm.errors import ConfigError

MAX_N = 1024  # hard cap of images per request in the API schema (a principal's limit is [serve] max_n)
MAX_STEPS = 1000  # hard cap of denoising steps in the API schema (a principal's limit is [serve] max_steps)
MAX_TIMESTEP = 999  # attribution noise levels are training timesteps in [0, num_train_timesteps)
_PRINCIPAL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,127}")  # = registry.keys.PRINCIPAL_PATTERN


@dataclass(frozen=True)
class ServeConfig:
    """``[serve]``: where ``cdm serve`` listens, who may call it anonymously, and the per-principal limits."""

    host: str = "127.0.0.1"  # interface to bind ("0.0.0.0" in a container)
    port: int = 8000  # 0 = ephemeral (the bound port is logged)
    workers: int = 1  # uvicorn worker processes; each follows the registry and loads its own composition
    anonymous_principal: str = ""  # "" = off (no token -> 401); else requests without a token act as this principal
    max_n: int = 16  # images per request, per principal (more -> 429)
    max_steps: int = 50  # denoising steps per request, per principal (more -> 429)
    max_concurrent: int = 2  # requests of one principal running at once, over every replica (more -> 429)
    sampling_threads: int = 1  # requests this process computes at once (the others wait their turn)
    request_lease_s: float = 600.0  # a request's concurrency slot expires after this even if its replica died
    max_upload_bytes: int = 4 * 1024 * 1024  # largest image body of POST /v1/attribute (more -> 413)
    attribute_timesteps: tuple[int, ...] = (50, 150, 300, 500)  # forward-process timesteps /v1/attribute noises at
    attribute_draws: int = 8  # noise draws per timestep, averaged
    max_attribute_draws: int = 64  # per request (more -> 429)
    audit_maxlen: int = 100_000  # approximate cap of the request audit stream (ns:serve:audit)
    metrics_max_principals: int = 50  # principals with their own /metrics label; the rest count as "other"
    resync_s: float = 5.0  # re-read the registry epoch at least this often even without a pub/sub event
    ready_max_lag_s: float = 60.0  # /readyz fails once the served epoch trails the registry's for this long

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"serve.port = {self.port} must be in 0..65535 (0 = ephemeral)")
        if not self.host.strip():
            raise ConfigError("serve.host is empty; give an interface such as 127.0.0.1 or 0.0.0.0")
        if self.anonymous_principal and not _PRINCIPAL.fullmatch(self.anonymous_principal):
            raise ConfigError(
                f"serve.anonymous_principal = {self.anonymous_principal!r} must be '' (off) or a principal name: "
                "1-128 characters from A-Z a-z 0-9 . _ @ -"
            )
        for name, value, high in (
            ("workers", self.workers, 256),
            ("max_n", self.max_n, MAX_N),
            ("max_steps", self.max_steps, MAX_STEPS),
            ("max_concurrent", self.max_concurrent, 100_000),
            ("sampling_threads", self.sampling_threads, 256),
            ("attribute_draws", self.attribute_draws, self.max_attribute_draws),
            ("max_attribute_draws", self.max_attribute_draws, 4096),
            ("audit_maxlen", self.audit_maxlen, 10**9),
            ("metrics_max_principals", self.metrics_max_principals, 10_000),
            ("max_upload_bytes", self.max_upload_bytes, 1 << 30),
        ):
            if not 1 <= value <= high:
                raise ConfigError(f"serve.{name} = {value} must be in 1..{high}")
        for name, seconds in (
            ("request_lease_s", self.request_lease_s),
            ("resync_s", self.resync_s),
            ("ready_max_lag_s", self.ready_max_lag_s),
        ):
            if seconds <= 0:
                raise ConfigError(f"serve.{name} = {seconds!r} must be > 0")
        if not self.attribute_timesteps or any(not 0 <= t <= MAX_TIMESTEP for t in self.attribute_timesteps):
            raise ConfigError(
                f"serve.attribute_timesteps = {list(self.attribute_timesteps)} must be a non-empty list of "
                f"timesteps in 0..{MAX_TIMESTEP}"
            )
