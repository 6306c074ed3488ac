"""The API's one exception type: every error response is ``{"error": CODE, "message": TEXT}`` with a status.

``message`` says what was wrong and what to do. Handlers in api/app.py turn ``ApiError``, request validation
errors, unknown routes and unexpected exceptions into that body.
"""

from __future__ import annotations

from collections.abc import Mapping


class ApiError(Exception):
    """An error response.

    Args:
        status: HTTP status code.
        code: short machine-readable code ("unauthorized", "forbidden", "limit_exceeded", ...).
        message: what was wrong and what to do.
        headers: extra response headers (WWW-Authenticate, Retry-After).
    """

    def __init__(self, status: int, code: str, message: str, *, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


def unauthorized(message: str) -> ApiError:
    return ApiError(401, "unauthorized", message, headers={"WWW-Authenticate": 'Bearer realm="cdm"'})


def forbidden(message: str) -> ApiError:
    return ApiError(403, "forbidden", message)


def invalid(message: str) -> ApiError:
    return ApiError(422, "invalid_request", message)


def limited(message: str, *, retry_after_s: int | None = None) -> ApiError:
    headers = {"Retry-After": str(retry_after_s)} if retry_after_s is not None else None
    return ApiError(429, "limit_exceeded", message, headers=headers)


def unavailable(message: str, *, retry_after_s: int = 1) -> ApiError:
    return ApiError(503, "unavailable", message, headers={"Retry-After": str(retry_after_s)})
