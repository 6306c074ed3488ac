"""Exceptions raised by the daemon. Every message names the bad value and what is allowed.

Configuration problems raise ``cdm.errors.ConfigError`` (shared with the library), not a daemon class; the
registry's own errors are in ``registry/errors.py``.
"""

from __future__ import annotations


class DaemonError(Exception):
    """Base class for every error the daemon raises on purpose."""


class RegistryUnavailable(DaemonError):
    """The registry's Redis cannot be reached at start-up (the message names its URL without credentials)."""


class MessageError(DaemonError):
    """A Kafka message cannot be decoded or validated; it goes to the dead-letter topic with ``reason``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason  # short, bounded label (used as the cdm_dlq_messages_total{reason} label)
        self.detail = detail


# Shutdown signals derive from BaseException, not Exception, on purpose (as rq's and arq's do): the
# handlers that protect one unit of work (`except Exception: log, dead-letter, continue`) must NOT swallow
# a request to stop, or the daemon would keep polling after SIGTERM. Only the service's top level catches
# them, in its `finally: teardown()` path.


class ShutdownRequested(BaseException):  # a signal, not an error
    """Warm shutdown (first SIGTERM/SIGINT): finish or checkpoint the current step, commit, then stop."""


class ColdShutdown(BaseException):  # a signal, not an error
    """Cold shutdown (second signal): stop now; work in progress is abandoned and redone after restart."""
