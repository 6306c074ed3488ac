"""The sampler package's exceptions (the library's own, ``cdm.errors``, keep their meaning: a bad request)."""

from __future__ import annotations


class SamplerUnavailable(RuntimeError):
    """The sampler cannot answer this request now: it waited longer than the sampler's timeout, or the sampler is
    shutting down. Not the request's fault: the HTTP layer answers 503 with ``Retry-After``.

    Args:
        message: what happened and what to do.
        retry_after_s: when a retry may succeed.
    """

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
