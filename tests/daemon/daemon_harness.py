"""Run real ``cdm daemon`` processes against the test Redis and Kafka-protocol broker (no mocks)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import redis
from kafka import KafkaProducer

from cdm.compartment import has_head
from cdm.data import SourceData, load_digits
from cli.config import render_config
from daemon.producer import push_source
from registry.coordination import Coordinator
from registry.keys import Keys
from registry.records import RegistrySnapshot
from registry.writer import Registry

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[2]


def digit_sources(n: int) -> dict[str, SourceData]:
    """sklearn digits split into ``n`` class-disjoint sources named d0.. (ids unique across sources)."""
    d = load_digits()
    assert d.labels is not None
    groups = np.array_split(np.arange(10), n)
    return {f"d{i}": d.subset(np.flatnonzero(np.isin(d.labels, g))) for i, g in enumerate(groups)}


def names_by_partition(partitions: int) -> list[str]:
    """Source ids whose keys the default (murmur2) partitioner sends to partitions 0..partitions-1."""
    from kafka.partitioner.default import murmur2

    found: dict[int, str] = {}
    i = 0
    while len(found) < partitions:
        name = f"s{i}"
        found.setdefault((murmur2(name.encode()) & 0x7FFFFFFF) % partitions, name)
        i += 1
    return [found[p] for p in range(partitions)]


@dataclass
class DaemonEnv:
    """One isolated daemon deployment: its own topics, consumer group, Redis namespace and directories."""

    root: Path
    redis_url: str
    bootstrap: str
    prefix: str
    namespace: str
    steps: int = 40
    checkpoint_every: int = 10
    lock_ttl_s: float = 10.0
    router_kind: str = "learnt"  # [router] kind: "learnt" | "density" | "heads"
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _logs: list[Any] = field(default_factory=list)
    _spools: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)  # spool slot -> its daemon

    @property
    def config_path(self) -> Path:
        return self.root / "config.toml"

    def write_config(self, path: Path | None = None, spool: Path | None = None, daemon_id: str = "cli") -> Path:
        """The shared config (for CLI commands), or one daemon's (``path``) with its own spool directory and
        replica id."""
        path = path or self.config_path
        self.root.mkdir(parents=True, exist_ok=True)
        prefix = self.prefix
        doc: dict[str, dict[str, Any]] = {
            "model": {"sample_size": 8, "block_out_channels": [16, 32]},
            "train": {
                "steps": self.steps,
                "batch_size": 32,
                "warmup_steps": 2,
                "checkpoint_every": self.checkpoint_every,
                "threads": 1,
            },
            "router": {
                "kind": self.router_kind,
                "steps": 30,
                "batch_size": 64,
                "channels": [16, 32],
                "eval_samples": 64,
                "threads": 1,
            },
            "sample": {"num_inference_steps": 3},
            "kafka": {
                "bootstrap_servers": self.bootstrap,
                "sources_topic": f"{prefix}.sources",
                "control_topic": f"{prefix}.control",
                "dlq_topic": f"{prefix}.dlq",
                "group_id": f"{prefix}.group",
                "session_timeout_ms": 6000,
                "heartbeat_interval_ms": 1000,
            },
            "redis": {"url": self.redis_url, "namespace": self.namespace},
            "daemon": {
                "daemon_id": daemon_id,
                "artifact_dir": self.root / "artifacts",
                "spool_dir": spool or self.root / "spool-0",
                "http_port": 0,
                "router_debounce_s": 0.5,
                "gc_grace_s": 3600,
                "poll_timeout_ms": 200,
                "heartbeat_ttl_s": 5,
                "lock_ttl_s": self.lock_ttl_s,
                "source_idle_seal_s": 3600,
            },
            "scheduler": {
                "heartbeat_s": 1,
                "seal_check_s": 1,
                "router_check_s": 0.5,
                "gc_s": 60,
                "lag_s": 1,
                "registry_resync_s": 1,
            },
        }
        path.write_text(render_config(doc, comment="written by tests/daemon/daemon_harness.py"))
        return path

    # -- processes ----------------------------------------------------------------------------------
    def start_daemon(self, name: str = "a", daemon_id: str | None = None) -> subprocess.Popen[bytes]:
        """Start a daemon; each running daemon has its own spool directory (a spool takes an exclusive lock) and
        replica id ``replica-<slot>`` (as a StatefulSet pod has its volume and hostname), and a daemon started
        after one exited (a restart) takes over the spool and the id it left."""
        self.write_config()
        free = [i for i, p in self._spools.items() if p.poll() is not None]
        slot = min(free) if free else len(self._spools)
        config = self.write_config(
            self.root / f"config-{name}.toml", self.root / f"spool-{slot}", daemon_id or f"replica-{slot}"
        )
        log = open(self.root / f"daemon-{name}.log", "ab")  # noqa: SIM115 - closed in stop_all
        self._logs.append(log)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli", "--config", str(config), "daemon", "--log-level", "INFO"],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        self.procs.append(proc)
        self._spools[slot] = proc
        return proc

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-4000:]}" for p in sorted(self.root.glob("daemon-*.log")))

    def stop_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for log in self._logs:
            log.close()
        self._logs.clear()

    # -- clients --------------------------------------------------------------------------------------
    def registry(self) -> Registry:
        return Registry(redis.Redis.from_url(self.redis_url), Keys(self.namespace))

    def coordinator(self) -> Coordinator:
        return Coordinator(redis.Redis.from_url(self.redis_url), Keys(self.namespace))

    def producer(self) -> KafkaProducer:
        return KafkaProducer(bootstrap_servers=self.bootstrap)

    def push(self, sources: dict[str, SourceData], chunk_size: int = 200) -> None:
        producer = self.producer()
        try:
            for name, data in sources.items():
                push_source(producer, f"{self.prefix}.sources", name, data, chunk_size=chunk_size, progress=False)
        finally:
            producer.close()

    def wait(self, what: str, check: Callable[[], T | None], timeout: float = 120.0) -> T:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = check()
            if value:
                return value
            for p in self.procs:
                if p.poll() not in (None, 0, -9) and p.returncode != -signal.SIGKILL:
                    raise AssertionError(f"daemon exited with {p.returncode} while waiting for {what}\n{self.logs()}")
            time.sleep(0.2)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{self.logs()}")

    def wait_serving(self, sources: set[str], timeout: float = 120.0) -> RegistrySnapshot:
        """Until the active compartments are exactly ``sources`` and all are served: with the learnt routing kind the
        router covers them all, with the heads kind each carries its head, with the density kind (no router) the
        active compartments are the composition."""
        reg = self.registry()

        def check() -> RegistrySnapshot | None:
            snap = reg.snapshot()
            active = {c.source for c in snap.compartments}
            if snap.routing == "density":
                covered = True
            elif snap.routing == "heads":
                covered = all(has_head(c.sha256) for c in snap.compartments)
            else:
                routed = set(snap.router.compartment_ids) if snap.router else set()
                covered = routed == set(snap.compartment_ids)
            return snap if active == sources and covered else None

        return self.wait(f"serving {sorted(sources)}", check, timeout)

    def http_port(self, daemon_index: int = 0) -> int:
        coordinator = self.coordinator()
        pid = self.procs[daemon_index].pid

        def check() -> int | None:
            for d in coordinator.live_daemons():
                if d.info.get("pid") == pid and d.info.get("http_port"):
                    return int(d.info["http_port"])
            return None

        return self.wait("the daemon's heartbeat with its http port", check, 60)


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def metric(text: str, name: str, labels: str = "") -> float | None:
    """The value of one sample in Prometheus exposition text."""
    want = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        if key == want:
            return float(value)
    return None


def as_json(x: Any) -> str:
    return json.dumps(x, default=str)


@contextlib.contextmanager
def daemon_env(root: Path, redis_url: str, bootstrap: str, name: str, **settings: Any) -> Iterator[DaemonEnv]:
    """A fresh deployment (topics, group and namespace ``name-<random>``) with its config written; every process
    it started is stopped on exit. ``settings``: DaemonEnv's fields (steps, checkpoint_every, router_kind, ...)."""
    tag = f"{name}-{uuid.uuid4().hex[:8]}"
    env = DaemonEnv(root=root, redis_url=redis_url, bootstrap=bootstrap, prefix=tag, namespace=tag, **settings)
    env.write_config()
    try:
        yield env
    finally:
        env.stop_all()
