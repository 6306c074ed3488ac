"""``[serve]``: the ``cdm serve`` HTTP sampler, typed and range-checked (read by ``daemon.config`` into AppConfig).

Sampling defaults (scheduler, steps, device, vectorisation) come from ``[sample]``; the registry from ``[redis]``.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, Field, model_validator

from cdm.errors import ConfigError
from common.settings import AsTuple, section

MAX_N = 1024  # hard cap of images per request in the API schema (a principal's limit is [serve] max_n)
MAX_STEPS = 1000  # hard cap of denoising steps in the API schema (a principal's limit is [serve] max_steps)
MAX_TIMESTEP = 999  # attribution noise levels are training timesteps in [0, num_train_timesteps)
_PRINCIPAL_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._@-")


def _check_principal(name: str) -> str:
    """'' (off) or a principal name as registry.keys.PRINCIPAL_PATTERN allows."""
    if name and (len(name) > 128 or not name[0].isalnum() or not set(name) <= _PRINCIPAL_CHARS):
        raise ValueError("must be '' (off) or a principal name: 1-128 characters from A-Z a-z 0-9 . _ @ -")
    return name


def _check_host(host: str) -> str:
    if not host.strip():
        raise ValueError("is empty; give an interface such as 127.0.0.1 or 0.0.0.0")
    return host


Seconds = Annotated[float, Field(gt=0, le=86_400)]
Timesteps = Annotated[
    tuple[Annotated[int, Field(ge=0, le=MAX_TIMESTEP)], ...], AsTuple, Field(min_length=1, max_length=64)
]


@section("serve", error=ConfigError)
class ServeConfig:
    """``[serve]``: where ``cdm serve`` listens, who may call it anonymously, and the per-principal limits."""

    host: Annotated[str, AfterValidator(_check_host)] = "127.0.0.1"  # interface to bind ("0.0.0.0" in a container)
    port: Annotated[int, Field(ge=0, le=65535)] = 8000  # 0 = ephemeral (the bound port is logged)
    # uvicorn worker processes; each follows the registry and loads its own composition
    workers: Annotated[int, Field(ge=1, le=256)] = 1
    # "" = off (no token -> 401); else requests without a token act as this principal
    anonymous_principal: Annotated[str, AfterValidator(_check_principal)] = ""
    max_n: Annotated[int, Field(ge=1, le=MAX_N)] = 16  # images per request, per principal (more -> 429)
    max_steps: Annotated[int, Field(ge=1, le=MAX_STEPS)] = 50  # denoising steps per request (more -> 429)
    # requests of one principal running at once, over every replica (more -> 429)
    max_concurrent: Annotated[int, Field(ge=1, le=100_000)] = 2
    # coalesce concurrent requests: one engine steps the rows of every request together (sampler/batching.py);
    # false = each request on its own, `sampling_threads` at once (sampler/engine.py PerRequestSampler)
    batching: bool = True
    # batching: model rows one engine iteration holds (a guided image counts twice); a larger request runs alone
    max_batch_rows: Annotated[int, Field(ge=1, le=65_536)] = 64
    # batching: how long an idle engine waits after a request arrives for others to start with it
    max_wait_ms: Annotated[float, Field(ge=0, le=10_000)] = 5.0
    # batching: a request not finished this long after it was queued fails with 503 (overload)
    sample_timeout_s: Seconds = 300.0
    sampling_threads: Annotated[int, Field(ge=1, le=256)] = 1  # batching = false: requests computed at once
    request_lease_s: Seconds = 600.0  # a request's concurrency slot expires after this even if its replica died
    max_upload_bytes: Annotated[int, Field(ge=1, le=1 << 30)] = 4 * 1024 * 1024  # image body of /v1/attribute
    attribute_timesteps: Timesteps = (50, 150, 300, 500)  # forward-process timesteps /v1/attribute noises at
    attribute_draws: Annotated[int, Field(ge=1, le=4096)] = 8  # noise draws per timestep, averaged
    max_attribute_draws: Annotated[int, Field(ge=1, le=4096)] = 64  # per request (more -> 429)
    audit_maxlen: Annotated[int, Field(ge=1, le=10**9)] = 100_000  # approximate cap of the request audit stream
    # principals with their own /metrics label; the rest count as "other"
    metrics_max_principals: Annotated[int, Field(ge=1, le=10_000)] = 50
    resync_s: Seconds = 5.0  # re-read the registry epoch at least this often even without a pub/sub event
    ready_max_lag_s: Seconds = 60.0  # /readyz fails once the served epoch trails the registry's for this long

    @model_validator(mode="after")
    def _check(self) -> ServeConfig:
        if self.attribute_draws > self.max_attribute_draws:
            raise ValueError(
                f"serve.attribute_draws = {self.attribute_draws} must be <= serve.max_attribute_draws = "
                f"{self.max_attribute_draws}"
            )
        if self.sample_timeout_s > self.request_lease_s:
            raise ValueError(
                f"serve.sample_timeout_s = {self.sample_timeout_s} must be <= serve.request_lease_s = "
                f"{self.request_lease_s}: a request's concurrency slot must outlive the request"
            )
        return self
