"""common.runtime: pid_alive and Periodic (the readiness threads of the daemon and of `cdm serve` both use it)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from common.runtime import Periodic, pid_alive


def test_pid_alive_tells_a_running_process_from_a_finished_one() -> None:
    assert pid_alive(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # reaped: the pid names no process now
    assert not pid_alive(child.pid)


def test_periodic_calls_at_start_then_every_interval_until_stopped() -> None:
    calls: list[int] = []
    third = threading.Event()

    def fn() -> None:
        calls.append(threading.get_ident())
        if len(calls) >= 3:
            third.set()

    periodic = Periodic(fn, 0.01, name="test-periodic")
    periodic.start()
    assert calls[0] == threading.get_ident()  # the first call is synchronous, in the caller's thread
    assert third.wait(5)
    periodic.stop()
    periodic.stop()  # idempotent
    stopped_at = len(calls)
    assert not any(t.name == "test-periodic" for t in threading.enumerate())
    time.sleep(0.05)  # five intervals: a thread still running would have called again
    assert len(calls) == stopped_at and all(t != calls[0] for t in calls[1:])


def test_periodic_refuses_a_non_positive_interval() -> None:
    with pytest.raises(ValueError, match="interval_s = 0 must be > 0"):
        Periodic(lambda: None, 0, name="x")
