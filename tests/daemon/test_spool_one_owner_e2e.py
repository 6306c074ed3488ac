"""Two real daemons pointed at one spool directory: the second refuses to start, naming the first (issue 8)."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.daemon.daemon_harness import REPO, DaemonEnv

pytestmark = [pytest.mark.services, pytest.mark.timeout(180)]


def test_a_second_daemon_on_the_same_spool_directory_refuses_to_start(
    tmp_path: Path, redis_db_url: str, kafka_bootstrap: str
) -> None:
    tag = uuid.uuid4().hex[:8]
    env = DaemonEnv(tmp_path / "d", redis_db_url, kafka_bootstrap, prefix=f"lock-{tag}", namespace=f"lock-{tag}")
    try:
        first = env.start_daemon("a")
        env.http_port()  # up and heartbeating: it holds its spool
        config = env.root / "config-a.toml"  # the same config, so the same daemon.spool_dir
        second = subprocess.run(
            [sys.executable, "-m", "daemon", "--config", str(config), "daemon", "--log-level", "INFO"],
            cwd=REPO, capture_output=True, timeout=120,
        )  # fmt: skip
        out = second.stdout.decode() + second.stderr.decode()
        assert second.returncode != 0, out
        assert f"spool directory {env.root / 'spool-0'} is in use by another daemon (pid {first.pid}" in out
        assert first.poll() is None  # the first one is unaffected
    finally:
        env.stop_all()
