"""daemon/identity.py: a stable replica id, and proof that a predecessor under it is dead (real processes)."""

from __future__ import annotations

import os
import subprocess
import sys

from daemon.config import DAEMON_ID
from daemon.identity import default_daemon_id, holder_is_dead, proc_start, process_identity


def test_the_default_id_is_the_hostname_made_a_valid_key() -> None:
    import socket

    assert DAEMON_ID.fullmatch(default_daemon_id())
    assert default_daemon_id() == default_daemon_id()  # stable across restarts (no pid in it)
    if DAEMON_ID.fullmatch(socket.gethostname()):
        assert default_daemon_id() == socket.gethostname()


def test_a_predecessor_on_this_host_is_dead_once_its_process_is_gone() -> None:
    me = process_identity()
    assert me["pid"] == os.getpid() and me["proc_start"] == proc_start(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        holder = dict(me, pid=child.pid, proc_start=proc_start(child.pid), nonce="child")
        assert not holder_is_dead(holder, me), "a running process with that pid and start time is alive"
        assert holder_is_dead(dict(holder, proc_start=(holder["proc_start"] or 0) + 1), me), "pid reused: dead"
    finally:
        child.kill()
        child.wait()
    assert holder_is_dead(holder, me), "killed (-9): its pid is no process now"
    assert holder_is_dead(dict(holder, pid=os.getpid()), me), "a predecessor with our own pid (container pid 1)"
    assert holder_is_dead(dict(holder, boot_id="another-boot"), me) == bool(me["boot_id"])
    assert not holder_is_dead(me, me), "ourselves"
    assert not holder_is_dead(dict(holder, host="elsewhere"), me), "another host: only the heartbeat's expiry tells"
