"""The daemon: services started in a declared order, stopped in reverse, warm then cold shutdown.

    bootstrap (redis, registry, metrics + HTTP, spool, worker, hot swap, kafka, scheduler)
      -> loop: poll Kafka (paused while a compartment trains, so the group keeps us) -> heartbeat
      -> finally: teardown in reverse order

The first SIGTERM/SIGINT is a warm shutdown: the poll loop ends, the training in progress checkpoints at its
next step, nothing unregistered is committed. A second signal exits at once (cold); a restart resumes.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import redis
from prometheus_client import CollectorRegistry

import cdm
from daemon.config import AppConfig
from daemon.errors import ColdShutdown, ShutdownRequested
from daemon.spool import Spool, SpoolLimits
from daemon.training_worker import ArtifactLayout, Job, Notices, TrainingWorker
from daemon.wire import ControlCommand, Origin
from registry.client import connect
from registry.coordination import Coordinator
from registry.keys import Keys
from registry.reader import RegistryClient
from registry.writer import Registry
from sampler.live import Composition, LiveComposition
from sampler.loader import CompositionLoader

log = logging.getLogger(__name__)


@dataclass
class Step:
    """One service: started in order, stopped in reverse order."""

    name: str
    stop: Callable[[], None]


class Service:
    """The long-running cdm daemon.

    Args:
        cfg: the whole configuration (loaded once by the caller).
        metrics_registry: Prometheus registry for this service (tests pass a fresh one).
        progress: show training progress bars on stderr.
    """

    def __init__(
        self, cfg: AppConfig, *, metrics_registry: CollectorRegistry | None = None, progress: bool = False
    ) -> None:
        self.cfg = cfg
        self.daemon_id = cfg.daemon.daemon_id or f"{socket.gethostname()}-{os.getpid()}"
        self.metrics_registry = metrics_registry or CollectorRegistry()
        self.progress = progress
        self._steps: list[Step] = []
        self._stop = threading.Event()
        self._signals = 0
        self._last_poll = 0.0
        self.started = threading.Event()
        # set during bootstrap
        self.redis: redis.Redis
        self.registry: Registry
        self.coordinator: Coordinator
        self.metrics: Any
        self.http: Any = None
        self.spool: Spool
        self.worker: TrainingWorker
        self.live: LiveComposition
        self.ingestor: Any
        self.scheduler: Any = None
        self.jobs: Any = None  # daemon.scheduling.Jobs

    # -- bootstrap ----------------------------------------------------------------------------------
    def _push(self, name: str, stop: Callable[[], None]) -> None:
        self._steps.append(Step(name, stop))
        log.info("started %s", name)

    def bootstrap(self) -> None:
        """Start every service in dependency order."""
        from kafka import KafkaConsumer, KafkaProducer

        from daemon.health import HealthServer
        from daemon.ingest import Ingestor
        from daemon.metrics import Metrics
        from daemon.scheduling import build_scheduler

        cfg = self.cfg
        # 1. redis + registry
        self.redis = connect(cfg.redis)
        self.redis.ping()
        keys = Keys(cfg.redis.namespace)
        self.registry = Registry(self.redis, keys)
        self.coordinator = Coordinator(self.redis, keys)
        self._push("redis", self.redis.close)
        self.coordinator.heartbeat(self.daemon_id, cfg.daemon.heartbeat_ttl_s, self._heartbeat_info())
        self._push("heartbeat", lambda: self.coordinator.clear_heartbeat(self.daemon_id))
        # 2. metrics + HTTP (/metrics, /healthz, /readyz)
        self.metrics = Metrics(registry=self.metrics_registry)
        self.http = HealthServer(
            cfg.daemon.http_host,
            cfg.daemon.http_port,
            registry=self.metrics_registry,
            is_alive=self.is_alive,
            is_ready=self.readiness,
            status=self.status,
        )
        self.http.start()
        self._push("http", self.http.stop)
        # 3. spool + worker
        self.spool = open_spool(cfg)
        self._push("spool", self.spool.close)
        self.metrics.spool_quarantined.inc(len(self.spool.quarantined))
        layout = ArtifactLayout(Path(cfg.daemon.artifact_dir))
        self.worker = TrainingWorker(
            registry=self.registry,
            coordinator=self.coordinator,
            spool=self.spool,
            layout=layout,
            library=cfg.library,
            daemon_id=self.daemon_id,
            lock_ttl_s=cfg.daemon.lock_ttl_s,
            notices=Notices(self._registered, self._dropped, self._control_done),
            metrics=self.metrics,
            progress=self.progress,
        )
        self.worker.start()
        self._push("training worker", lambda: self.worker.stop(timeout=120))
        # 4. hot-swapped composition following the registry
        loader = CompositionLoader(device=cfg.daemon.device, vectorize=cfg.library.sample.vectorize)
        self.live = LiveComposition(
            RegistryClient(self.redis, keys),
            loader,
            sample=cfg.library.sample,
            metrics=self.metrics,
            resync_s=cfg.scheduler.registry_resync_s,
            on_swap=self._on_swap,
        )
        self.live.start()
        self._push("hot swap", self.live.stop)
        # 5. kafka (topics created with their partition count: never rely on broker auto-creation)
        if cfg.kafka.create_topics:
            ensure_topics(cfg.kafka)
        consumer = KafkaConsumer(**cfg.kafka.consumer_kwargs(client_id=f"{cfg.kafka.client_id}-{self.daemon_id}"))
        producer = KafkaProducer(**cfg.kafka.producer_kwargs())
        self.ingestor = Ingestor(
            consumer,
            producer,
            self.spool,
            self.metrics,
            cfg.kafka,
            on_sealed=lambda source: self.worker.submit(Job("train", source)),
            on_control=self._on_control,
            claim_check_root=Path(cfg.daemon.claim_check_dir).resolve() if cfg.daemon.claim_check_dir else None,
            max_ref_bytes=cfg.daemon.max_claim_check_bytes,
            max_decoded_bytes=cfg.daemon.max_decoded_bytes,
            max_chunks_per_source=cfg.daemon.max_chunks_per_source,
            lag_interval_s=cfg.scheduler.lag_s,
            retry_initial_s=cfg.daemon.ingest_retry_initial_s,
            retry_max_s=cfg.daemon.ingest_retry_max_s,
        )

        def close_kafka() -> None:
            try:
                self.ingestor.close()
            finally:
                consumer.close()
                producer.close(timeout=5)

        self._push("kafka", close_kafka)
        # 6. scheduled jobs
        self.scheduler = build_scheduler(self)
        self.scheduler.start()
        self._push("scheduler", lambda: self.scheduler.shutdown(wait=False))
        self.started.set()

    def teardown(self) -> None:
        """Stop every started service in reverse order; each failure is logged, none stops the others."""
        while self._steps:
            step = self._steps.pop()
            try:
                step.stop()
                log.info("stopped %s", step.name)
            except Exception:
                log.exception("stopping %s failed", step.name)

    # -- the loop -----------------------------------------------------------------------------------
    def run(self, *, install_signals: bool = True) -> int:
        """bootstrap -> poll loop -> teardown. Returns the process exit code."""
        if install_signals:
            signal.signal(signal.SIGTERM, self._on_signal)
            signal.signal(signal.SIGINT, self._on_signal)
        try:
            self.bootstrap()
            log.info("cdm daemon %s ready (http port %s)", self.daemon_id, self.http_port)
            while not self._stop.is_set():
                self.loop_once()
            return 0
        except ShutdownRequested:
            return 0
        except ColdShutdown:
            log.warning("cold shutdown: exiting now; interrupted work resumes on restart")
            os._exit(130)
        finally:
            self.teardown()

    def loop_once(self) -> None:
        # 1. keep the group membership while training: poll with partitions paused
        if self.worker.idle():
            self.ingestor.resume_all()
        else:
            self.ingestor.pause_all()
        self.ingestor.poll_once(timeout_ms=self.cfg.daemon.poll_timeout_ms)
        self._last_poll = time.monotonic()

    def request_stop(self) -> None:
        """Warm shutdown from any thread."""
        self._stop.set()
        if hasattr(self, "worker"):
            self.worker.stop(timeout=0)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals += 1
        if self._signals == 1:
            log.warning("signal %d: warm shutdown (checkpoint, commit only what is registered)", signum)
            self.request_stop()
        else:
            raise ColdShutdown()

    # -- callbacks from the worker and the ingestor --------------------------------------------------
    def _registered(self, source: str) -> None:
        self.ingestor.mark_source_registered(source)

    def _dropped(self, source: str) -> None:
        self.ingestor.mark_source_dropped(source)

    def _control_done(self, origin: Origin) -> None:
        self.ingestor.mark_control_done(origin)

    def _on_control(self, cmd: ControlCommand, origin: Origin) -> None:
        if cmd.op in ("forget-source", "forget-samples") and not cmd.source:
            raise ValueError(f"{cmd.op} needs a source")  # dead-lettered as control-failed
        if cmd.op == "forget-source":
            self.worker.submit(Job("forget-source", cmd.source or "", origin=origin, request_id=cmd.request_id or ""))
        elif cmd.op == "forget-samples":
            ids = tuple(cmd.sample_ids)
            self.worker.submit(
                Job("forget-samples", cmd.source or "", ids, origin=origin, request_id=cmd.request_id or "")
            )
        elif cmd.op == "retrain-router":
            self.worker.submit(Job("retrain-router", origin=origin, request_id=cmd.request_id or ""))

    def _on_swap(self, comp: Composition | None) -> None:
        self.metrics.compartments_active.set(len(comp.compartment_ids) if comp else 0)

    # -- health ---------------------------------------------------------------------------------------
    @property
    def http_port(self) -> int | None:
        return self.http.port if self.http is not None else None

    def is_alive(self) -> bool:
        """The poll loop ran recently and the worker thread lives."""
        fresh = time.monotonic() - self._last_poll < max(30.0, 10 * self.cfg.daemon.poll_timeout_ms / 1000)
        return self.started.is_set() and fresh and self.worker.alive

    def readiness(self) -> tuple[bool, str]:
        """Redis reachable and a composition loaded."""
        try:
            self.redis.ping()
        except redis.RedisError as exc:
            return False, f"redis unreachable: {exc}"
        ingestor = getattr(self, "ingestor", None)
        if ingestor is not None and (problem := ingestor.problem()) is not None:
            return False, f"ingest is backing off: {problem}"
        if self.live.current() is None:
            return False, "no composition loaded yet (no compartment and router registered)"
        return True, f"serving epoch {self.live.current().epoch}"  # type: ignore[union-attr]

    def status(self) -> dict[str, Any]:
        comp = self.live.current() if hasattr(self, "live") else None
        w = self.worker.status if hasattr(self, "worker") else None
        return {
            "daemon_id": self.daemon_id,
            "version": cdm.__version__,
            "epoch": comp.epoch if comp else None,
            "sources": list(comp.sources) if comp else [],
            "pending": list(comp.pending) if comp else [],
            "hotswap_error": self.live.last_error if hasattr(self, "live") else None,
            "worker": vars(w) if w else None,
        }

    def _heartbeat_info(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "version": cdm.__version__,
            "http_port": self.http_port,
        }
        if hasattr(self, "worker"):
            info.update(job=self.worker.status.job, source=self.worker.status.source, step=self.worker.status.step)
        return info

    def heartbeat(self) -> None:
        self.coordinator.heartbeat(self.daemon_id, self.cfg.daemon.heartbeat_ttl_s, self._heartbeat_info())


def open_spool(cfg: AppConfig) -> Spool:
    """The daemon's spool: locked to this process, with the configured limits and the model's compatibility
    check (a source that can never train is refused at its seal, not after a training run)."""
    from cdm.training import check_trainable

    d, model = cfg.daemon, cfg.library.model
    limits = SpoolLimits(
        max_sources=d.spool_max_sources,
        max_source_chunks=d.max_chunks_per_source,
        max_source_samples=d.spool_max_source_samples,
        max_source_bytes=d.spool_max_source_bytes,
        max_bytes=d.spool_max_bytes,
    )
    return Spool(
        Path(d.spool_dir),
        limits=limits,
        check=functools.partial(check_trainable, model=model, num_classes=model.num_classes),
    )


def ensure_topics(kafka: Any) -> list[str]:
    """Create the sources, control and dead-letter topics if they are missing; returns those created."""
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import TopicAlreadyExistsError

    admin = KafkaAdminClient(**kafka.client_kwargs())
    created = []
    try:
        existing = set(admin.list_topics())
        for name in (kafka.sources_topic, kafka.control_topic, kafka.dlq_topic):
            if name in existing:
                continue
            try:
                admin.create_topics([NewTopic(name, kafka.partitions, kafka.replication_factor)])
                created.append(name)
            except TopicAlreadyExistsError:
                pass  # another replica created it first
    finally:
        admin.close()
    if created:
        log.info("created topics %s with %d partitions", created, kafka.partitions)
    return created
