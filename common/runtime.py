"""Small process and thread helpers: is a pid alive, and a function run every few seconds on its own thread."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable


def pid_alive(pid: int) -> bool:
    """True when a process ``pid`` exists on this host (one of another user's counts too; a zombie counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Periodic:
    """Calls ``fn()`` at ``start()`` and then every ``interval_s`` seconds on a daemon thread until ``stop()``.

    ``fn`` handles its own errors: one that escapes ends the thread.
    """

    def __init__(self, fn: Callable[[], object], interval_s: float, *, name: str) -> None:
        if interval_s <= 0:
            raise ValueError(f"{name}: interval_s = {interval_s} must be > 0")
        self.fn = fn
        self.interval_s = interval_s
        self.name = name
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Call ``fn`` now, then start the thread."""
        self._stop.clear()
        self.fn()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread (waits up to 10 s for a running ``fn``); idempotent."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.fn()
