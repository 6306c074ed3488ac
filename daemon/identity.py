"""A replica's stable identity and the proof that a predecessor under the same identity is dead.

The daemon id defaults to the hostname (stable in a Kubernetes StatefulSet: pod ``cdm-0`` is ``cdm-0`` again
after a restart), so a restarted daemon owns the locks its predecessor held and takes them back at once instead
of waiting for their leases to expire. Its heartbeat carries ``host``, ``pid``, ``boot_id`` (the kernel's boot
id), ``proc_start`` (the process start time in clock ticks since boot) and a random ``nonce``: on the same host a
predecessor is provably dead when the host rebooted since, when its pid is no process now, or when that pid is
now another process (a different start time). From another host nothing is provable: the heartbeat must expire.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common.runtime import pid_alive
from daemon.config import DAEMON_ID

_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def default_daemon_id() -> str:
    """The hostname, made a valid daemon id (registry key part)."""
    host = socket.gethostname() or "cdm"
    safe = "".join(c if c.isalnum() or c in "._:-" else "-" for c in host)[:128]
    return safe if DAEMON_ID.fullmatch(safe) else f"cdm-{safe}"[:128]


def boot_id() -> str:
    """The kernel's boot id ("" where /proc does not have it)."""
    try:
        return _BOOT_ID.read_text().strip()
    except OSError:
        return ""


def proc_start(pid: int) -> int | None:
    """Start time of process ``pid`` in clock ticks since boot; None when there is no such process (or no /proc)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:
        return None
    # the command name (field 2) is in parentheses and may hold spaces: fields after the last ")" are fixed
    fields = raw[raw.rfind(")") + 2 :].split()
    try:
        return int(fields[19])  # field 22 of stat(5), the 20th after the command name
    except (IndexError, ValueError):
        return None


def process_identity() -> dict[str, Any]:
    """This process as a heartbeat describes it."""
    pid = os.getpid()
    return {
        "host": socket.gethostname(),
        "pid": pid,
        "boot_id": boot_id(),
        "proc_start": proc_start(pid),
        "nonce": uuid.uuid4().hex,
    }


def holder_is_dead(holder: Mapping[str, Any], me: Mapping[str, Any]) -> bool:
    """True when the process that wrote heartbeat ``holder`` is provably gone (``me``: this process's identity)."""
    if holder.get("nonce") == me.get("nonce"):
        return False  # it is us
    if holder.get("host") != me.get("host"):
        return False  # another host: only its heartbeat's expiry tells
    if holder.get("boot_id") and me.get("boot_id") and holder["boot_id"] != me["boot_id"]:
        return True  # the host rebooted since
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    if pid == me.get("pid"):
        return True  # we have its pid now, so it is not running (a restarted container's pid 1, say)
    start = proc_start(pid)
    if start is None:
        return boot_id() != "" or not pid_alive(pid)
    recorded = holder.get("proc_start")
    return isinstance(recorded, int) and recorded != start  # the pid was reused by another process
