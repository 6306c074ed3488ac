"""What the command line says when a service it needs cannot be reached: the address tried and what to do.

A user's mistake or a missing service is one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable

REDIS_HINT = (
    "start the local services with `cdm services start` (or `make services-start`), or point cdm at your Redis: "
    "--redis URL, [redis] url in config.toml, or CDM_REDIS__URL"
)
KAFKA_HINT = (
    "start the local services with `cdm services start` (or `make services-start`), or point cdm at your "
    "brokers: [kafka] bootstrap_servers in config.toml, CDM_KAFKA__BOOTSTRAP_SERVERS, or --services FILE"
)


class ServiceUnreachable(Exception):
    """A service the command needs does not answer; the message names it, the address tried and the fix."""


def check_reachable(what: str, addresses: str | Iterable[str], hint: str, timeout_s: float = 3.0) -> None:
    """Raise ``ServiceUnreachable`` unless one of ``addresses`` ("host:port", comma-separated or a list) accepts
    a TCP connection within ``timeout_s``."""
    wanted = [a.strip() for a in (addresses.split(",") if isinstance(addresses, str) else addresses) if a.strip()]
    errors: list[str] = []
    for address in wanted:
        host, _, port = address.rpartition(":")
        try:
            with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=timeout_s):
                return
        except (OSError, ValueError) as exc:
            errors.append(f"{address}: {exc.strerror if isinstance(exc, OSError) and exc.strerror else exc}")
    raise ServiceUnreachable(
        f"cannot reach {what} at {', '.join(wanted) or '(no address)'} ({'; '.join(errors)}); {hint}"
    )


def explain(exc: BaseException) -> str | None:
    """One line for a Redis or Kafka connection failure (None for anything else)."""
    import kafka.errors
    import redis.exceptions

    if isinstance(exc, ServiceUnreachable):
        return str(exc)
    if isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
        return f"cannot reach Redis ({exc}); {REDIS_HINT}"
    if isinstance(
        exc, kafka.errors.NoBrokersAvailable | kafka.errors.KafkaTimeoutError | kafka.errors.KafkaConnectionError
    ):
        return f"cannot reach the Kafka broker ({exc}); {KAFKA_HINT}"
    return None
