"""Readiness computed in the background, read by ``/readyz``: a probe never waits on Redis.

``ReadinessCache(check, interval_s)`` runs ``check()`` (which may ping Redis) on its own thread at most every
``interval_s`` seconds; ``current()`` returns the last result at once. However many clients poll ``/readyz``, the
daemon sends Redis at most one PING per interval. Until the first check, and when the last result is older than
``stale_after_s`` (the check is stuck, e.g. on a Redis timeout), the daemon reports itself not ready.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from api.health import Readiness
from common.redact import safe
from common.runtime import Periodic

log = logging.getLogger(__name__)


class ReadinessCache:
    """The last readiness ``check()`` result, refreshed every ``interval_s`` by ``start()``'s thread.

    Args:
        check: computes readiness (may block on Redis up to its socket timeout); exceptions count as not ready.
        interval_s: seconds between two checks.
        stale_after_s: a result older than this reports "not refreshed" (default: three intervals).
        clock: monotonic seconds (injectable for tests).
    """

    def __init__(
        self,
        check: Callable[[], Readiness],
        interval_s: float,
        *,
        stale_after_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.check = check
        self.interval_s = interval_s
        self.stale_after_s = stale_after_s if stale_after_s is not None else 3 * interval_s
        self.clock = clock
        self.checks = 0  # how many times check() ran
        self._last: tuple[float, Readiness] | None = None
        self._periodic = Periodic(self.refresh, interval_s, name="cdm-readiness")

    def refresh(self) -> Readiness:
        """Run the check now and remember its result."""
        try:
            result = self.check()
        except Exception as exc:
            result = Readiness(False, (safe(f"readiness check failed: {type(exc).__name__}: {exc}"),))
        self.checks += 1
        previous = self._last[1].ready if self._last is not None else None
        self._last = (self.clock(), result)
        if previous is not None and previous != result.ready:
            log.info("readiness: %s", "ready" if result.ready else "not ready: " + "; ".join(result.reasons))
        return result

    def current(self) -> Readiness:
        """The last result, without checking anything (what /readyz answers)."""
        last = self._last
        if last is None:
            return Readiness(False, ("starting: readiness not checked yet",))
        age = self.clock() - last[0]
        if age > self.stale_after_s:
            return Readiness(False, (f"readiness not refreshed for {age:.0f}s (the check is stuck)",))
        return last[1]

    def start(self) -> Callable[[], None]:
        """Check now, then every ``interval_s`` on a daemon thread; returns the stop function."""
        self._periodic.start()
        return self.stop

    def stop(self) -> None:
        self._periodic.stop()
