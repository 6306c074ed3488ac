"""The daemon: services started in a declared order, stopped in reverse, warm then cold shutdown.

    Service(cfg)   builds every part; nothing connects yet (only the spool opens: it locks its directory, recovers)
    run():  start-up steps, in order: redis -> identity -> http -> readiness -> spool -> training worker -> hot swap ->
            kafka -> scheduler
              (each step starts one service and returns the function that stops it)
      -> loop: poll Kafka (paused while a compartment trains, so the group keeps us)
      -> finally: teardown, calling the stop functions in reverse order

The first SIGTERM/SIGINT is a warm shutdown: the poll loop ends, the training in progress checkpoints at its
next step, nothing unregistered is committed. A second signal exits at once (cold); a restart resumes.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import redis
from kafka import KafkaConsumer, KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import TopicAlreadyExistsError
from prometheus_client import CollectorRegistry

import cdm
from api.health import Readiness, create_health_app
from api.server import AppServer
from api.ui import GridCache, GridSpec, LocalStatus, Progress, StatusPage
from cdm.artifacts import ArtifactStore, open_store
from cdm.lifecycle import Tombstone
from cdm.training import check_trainable
from common.redact import redact_url, safe
from daemon.catalogue import tombstone_of
from daemon.config import AppConfig, KafkaConfig, SchedulerConfig
from daemon.errors import ColdShutdown, RegistryUnavailable, ShutdownRequested
from daemon.identity import default_daemon_id, holder_is_dead, process_identity
from daemon.ingest import Ingestor
from daemon.jobs import Jobs, build_scheduler, first_staged_at
from daemon.metrics import FORGET_KINDS, Metrics
from daemon.readiness import ReadinessCache
from daemon.spool import Spool, SpoolLimits
from daemon.wire import REASONS, ControlCommand, Origin
from daemon.worker import Job, Notices, RetryPolicy, TrainingWorker
from registry.client import connect
from registry.coordination import Coordinator
from registry.errors import IdentityInUse
from registry.keys import Keys
from registry.reader import RegistryClient
from registry.writer import Registry
from sampler.live import Composition, LiveComposition
from sampler.loader import CompositionLoader

log = logging.getLogger(__name__)

Stop = Callable[[], None]


@dataclass(frozen=True)
class Step:
    """One start-up step: ``start()`` brings one service up and returns the function that stops it."""

    name: str
    start: Callable[[], Stop]


@dataclass(frozen=True)
class Started:
    """A step that has started: stopped in reverse order at teardown."""

    name: str
    stop: Stop


# ------------------------------------------------------------------------------------------ start-up steps


def start_redis(client: redis.Redis, url: str, registry: Registry, routing: str) -> Stop:
    """Fail fast when the registry's Redis is unreachable; publish this daemon's ``[router] kind`` as the registry's
    routing kind (readers compose by it); closing the client is the stop."""
    try:
        client.ping()
    except redis.RedisError as exc:
        client.close()
        raise RegistryUnavailable(
            f"cannot reach the registry's Redis at {redact_url(url)}: {safe(exc)}; check [redis] url, "
            "its credentials (CDM_REDIS__PASSWORD) and the network"
        ) from None
    registry.set_routing(routing)
    return client.close


def start_identity(
    coordinator: Coordinator,
    daemon_id: str,
    ttl_s: float,
    info: Callable[[], Mapping[str, Any]],
    me: Mapping[str, Any],
) -> Stop:
    """Claim this replica's identity and announce it (the scheduler refreshes the heartbeat); then take back the
    locks a dead predecessor under the same id still held. Refuses (IdentityInUse) while another live process
    holds the id. The stop removes the heartbeat so others see us gone at once."""
    predecessor = coordinator.claim_identity(
        daemon_id, ttl_s, info(), holder_is_dead=lambda holder: holder_is_dead(holder, me)
    )
    if predecessor is not None:
        log.warning(
            "daemon id %s: replaced the heartbeat of a dead predecessor (pid %s)", daemon_id, predecessor.get("pid")
        )
    released = coordinator.release_locks(daemon_id)
    if released:
        log.warning("daemon id %s: took back %d lock(s) of a previous run: %s", daemon_id, len(released), released)
    return lambda: coordinator.clear_heartbeat(daemon_id)


def start_http(http: AppServer, grids: GridCache) -> Stop:
    """Serve /metrics, /healthz, /readyz, /status and /ui (uvicorn in a thread, read timeout, connection cap); the
    stop also ends the status page's grid drawing."""
    http.start()

    def stop() -> None:
        try:
            http.stop()
        finally:
            grids.close()

    return stop


def start_readiness(readiness: ReadinessCache) -> Stop:
    """Compute readiness now and every [daemon] readiness_refresh_s; /readyz reads the result."""
    return readiness.start()


def start_spool(spool: Spool, metrics: Metrics) -> Stop:
    """Report what opening the spool moved aside; closing it releases the directory lock."""
    metrics.spool_quarantined.inc(len(spool.quarantined))
    return spool.close


def start_worker(worker: TrainingWorker) -> Stop:
    """The training thread; its stop lets the training in progress checkpoint (up to two minutes)."""
    worker.start()
    return lambda: worker.stop(timeout=120)


def start_hot_swap(live: LiveComposition) -> Stop:
    """Follow the registry and serve its composition."""
    live.start()
    return live.stop


def start_scheduler(jobs: Jobs, sc: SchedulerConfig) -> Stop:
    """The periodic jobs (heartbeat, idle seal, router check, garbage collection, gauges)."""
    scheduler = build_scheduler(jobs, sc)
    scheduler.start()
    return lambda: scheduler.shutdown(wait=False)


class KafkaIngest:
    """The Kafka side of the daemon, started as one step: topics, consumer, dead-letter producer, Ingestor.

    Args:
        cfg: ``[kafka]``.
        client_id: this replica's Kafka client id.
        spool: where accepted chunks are staged.
        metrics: the daemon's metrics.
        on_sealed: called with a source once it is complete (submits its training).
        on_control: called with each control command and its origin.
        claim_check_root: chunk-ref files must lie under it; None refuses them.
        max_ref_bytes: largest claim-check file read.
        max_decoded_bytes: largest uncompressed size of one chunk's arrays.
        max_chunks_per_source: a seal announcing more chunks, or a cdm-seq not below it, is dead-lettered.
        lag_interval_s: how often the consumer lag is exported.
        retry_initial_s: first back-off after a broker or spool I/O failure (doubling per failure)...
        retry_max_s: ...up to this.
        broker_check_s: how often the broker is asked whether it answers (a broker outage).
        tombstone: the registry tombstone of a source, None if it was never forgotten (records older than it
            are ignored).
    """

    def __init__(
        self,
        cfg: KafkaConfig,
        *,
        client_id: str,
        spool: Spool,
        metrics: Metrics,
        on_sealed: Callable[[str], None],
        on_control: Callable[[ControlCommand, Origin], None],
        claim_check_root: Path | None,
        max_ref_bytes: int,
        max_decoded_bytes: int,
        max_chunks_per_source: int,
        lag_interval_s: float,
        retry_initial_s: float,
        retry_max_s: float,
        broker_check_s: float = 5.0,
        tombstone: Callable[[str], Tombstone | None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.client_id = client_id
        self.spool = spool
        self.metrics = metrics
        self.on_sealed = on_sealed
        self.on_control = on_control
        self.claim_check_root = claim_check_root
        self.max_ref_bytes = max_ref_bytes
        self.max_decoded_bytes = max_decoded_bytes
        self.max_chunks_per_source = max_chunks_per_source
        self.lag_interval_s = lag_interval_s
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self.broker_check_s = broker_check_s
        self.tombstone = tombstone
        self._ingestor: Ingestor | None = None  # the clients connect when built, so only start() builds them

    def start(self) -> Stop:
        # topics are created with their partition count: never rely on broker auto-creation
        if self.cfg.create_topics:
            ensure_topics(self.cfg)
        consumer = KafkaConsumer(**self.cfg.consumer_kwargs(client_id=self.client_id))
        producer = KafkaProducer(**self.cfg.producer_kwargs())
        ingestor = Ingestor(
            consumer,
            producer,
            self.spool,
            self.metrics,
            self.cfg,
            on_sealed=self.on_sealed,
            on_control=self.on_control,
            claim_check_root=self.claim_check_root,
            max_ref_bytes=self.max_ref_bytes,
            max_decoded_bytes=self.max_decoded_bytes,
            max_chunks_per_source=self.max_chunks_per_source,
            lag_interval_s=self.lag_interval_s,
            retry_initial_s=self.retry_initial_s,
            retry_max_s=self.retry_max_s,
            broker_check_s=self.broker_check_s,
            tombstone=self.tombstone,
        )
        self._ingestor = ingestor

        def stop() -> None:
            try:
                ingestor.close()
            finally:
                consumer.close()
                producer.close(timeout=5)

        return stop

    def problem(self) -> str | None:
        """Why ingest is backing off; None when it is not (or has not started)."""
        return self._ingestor.problem() if self._ingestor is not None else None

    @property
    def ingestor(self) -> Ingestor:
        """The running Ingestor (the poll loop and the worker's notices run only after the kafka step)."""
        if self._ingestor is None:
            raise RuntimeError("the kafka step has not started yet: there is no Ingestor to use")
        return self._ingestor


# ------------------------------------------------------------------------------------------ the service


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
        self.daemon_id = cfg.daemon.daemon_id or default_daemon_id()
        self.identity = process_identity()  # host, pid, boot id, start time, nonce: in every heartbeat
        self.metrics_registry = metrics_registry or CollectorRegistry()
        self.progress = progress
        self.started = threading.Event()
        self._stop = threading.Event()
        self._signals = 0
        self._last_poll = 0.0
        self._started: list[Started] = []
        # the parts, in dependency order (redis-py and the threads below connect or run only when started)
        keys = Keys(cfg.redis.namespace)
        self.redis = connect(cfg.redis)
        self.registry = Registry(self.redis, keys)
        self.coordinator = Coordinator(self.redis, keys)
        self.metrics = Metrics(
            registry=self.metrics_registry,
            dlq_reasons=REASONS,
            volumes={
                "spool": cfg.daemon.spool_dir,
                "artifacts": cfg.daemon.artifact_dir,
                "cache": cfg.cache_base_dir / cfg.artifacts.cache_dir,
            },
        )
        self.readiness = ReadinessCache(
            self.check_readiness,
            cfg.daemon.readiness_refresh_s,
            # a check blocked on a Redis timeout (connect + command) is not yet "stuck"
            stale_after_s=3 * cfg.daemon.readiness_refresh_s
            + cfg.redis.socket_connect_timeout_s
            + cfg.redis.socket_timeout_s,
        )
        self.live = LiveComposition(
            RegistryClient(self.redis, keys),
            CompositionLoader.from_config(
                cfg.artifacts,  # [artifacts]; url "" = [daemon] artifact_dir is the store
                default_dir=Path(cfg.daemon.artifact_dir),
                base_dir=cfg.cache_base_dir,
                device=cfg.daemon.device,
                vectorize=cfg.library.sample.vectorize,
                metrics=self.metrics,
            ),
            sample=cfg.library.sample,
            metrics=self.metrics,
            resync_s=cfg.scheduler.registry_resync_s,
            on_swap=self._on_swap,
        )
        # /ui: every source, the sample grid drawn in the background per epoch (a page view never samples)
        self.grids = GridCache(GridSpec.of(cfg.library.sample))
        self.ui = StatusPage(
            title="cdm daemon",
            reader=self.registry,
            live=self.live,
            grids=self.grids,
            coordinator=self.coordinator,
            local=self.ui_local,
            own_daemon_id=self.daemon_id,
        )
        self.http = AppServer(
            create_health_app(self.metrics_registry, self.is_alive, self.readiness.current, self.status, ui=self.ui),
            cfg.daemon.http_host,
            cfg.daemon.http_port,
            read_timeout_s=cfg.daemon.http_read_timeout_s,
            max_connections=cfg.daemon.http_max_connections,
            name="cdm-health",
        )
        self.spool = open_spool(cfg)
        self.store: ArtifactStore = open_store(cfg.artifacts, default_dir=Path(cfg.daemon.artifact_dir))
        self.metrics.ready.set_function(lambda: 1.0 if self.readiness.current().ready else 0.0)
        self.metrics.spool_limit_bytes.set(cfg.daemon.spool_max_bytes)
        self.worker = TrainingWorker(
            registry=self.registry,
            coordinator=self.coordinator,
            spool=self.spool,
            store=self.store,
            work_root=Path(cfg.daemon.artifact_dir),
            library=cfg.library,
            daemon_id=self.daemon_id,
            lock_ttl_s=cfg.daemon.lock_ttl_s,
            notices=Notices(
                self._registered, self._dropped, self._control_done, self._training_failed, self._control_failed
            ),
            metrics=self.metrics,
            progress=progress,
            retry=RetryPolicy(
                max_attempts=cfg.daemon.job_max_attempts,
                initial_s=cfg.daemon.job_retry_initial_s,
                max_s=cfg.daemon.job_retry_max_s,
            ),
        )
        self.metrics.jobs_queued.set_function(self.worker.pending)
        self.kafka = KafkaIngest(
            cfg.kafka,
            client_id=f"{cfg.kafka.client_id}-{self.daemon_id}",
            spool=self.spool,
            metrics=self.metrics,
            on_sealed=self._sealed,
            on_control=self._on_control,
            claim_check_root=Path(cfg.daemon.claim_check_dir).resolve() if cfg.daemon.claim_check_dir else None,
            max_ref_bytes=cfg.daemon.max_claim_check_bytes,
            max_decoded_bytes=cfg.daemon.max_decoded_bytes,
            max_chunks_per_source=cfg.daemon.max_chunks_per_source,
            lag_interval_s=cfg.scheduler.lag_s,
            retry_initial_s=cfg.daemon.ingest_retry_initial_s,
            retry_max_s=cfg.daemon.ingest_retry_max_s,
            broker_check_s=cfg.daemon.broker_check_s,
            tombstone=self._tombstone,
        )
        self.jobs = Jobs(
            spool=self.spool,
            worker=self.worker,
            registry=self.registry,
            coordinator=self.coordinator,
            metrics=self.metrics,
            daemon=cfg.daemon,
            daemon_id=self.daemon_id,
            heartbeat=self.heartbeat,
        )
        # the start-up order; teardown runs the stops in reverse
        self.steps: tuple[Step, ...] = (
            Step(
                "redis",
                functools.partial(start_redis, self.redis, cfg.redis.url, self.registry, cfg.library.router.kind),
            ),
            Step(
                "identity",
                functools.partial(
                    start_identity,
                    self.coordinator,
                    self.daemon_id,
                    cfg.daemon.heartbeat_ttl_s,
                    self._heartbeat_info,
                    self.identity,
                ),
            ),
            Step("http", functools.partial(start_http, self.http, self.grids)),
            Step("readiness", functools.partial(start_readiness, self.readiness)),
            Step("spool", functools.partial(start_spool, self.spool, self.metrics)),
            Step("training worker", functools.partial(start_worker, self.worker)),
            Step("hot swap", functools.partial(start_hot_swap, self.live)),
            Step("kafka", self.kafka.start),
            Step("scheduler", functools.partial(start_scheduler, self.jobs, cfg.scheduler)),
        )

    # -- bootstrap and teardown ---------------------------------------------------------------------
    def bootstrap(self) -> None:
        """Run every start-up step in order, remembering each stop function as soon as its step succeeded."""
        for step in self.steps:
            stop = step.start()
            self._started.append(Started(step.name, stop))
            log.info("started %s", step.name)
        self.started.set()

    def teardown(self) -> None:
        """Stop every started service in reverse order; each failure is logged, none stops the others."""
        while self._started:
            step = self._started.pop()
            try:
                step.stop()
                log.info("stopped %s", step.name)
            except Exception:
                log.exception("stopping %s failed", step.name)
        self.spool.close()  # idempotent: also releases the lock when start-up failed before the spool step

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
        except IdentityInUse as exc:
            log.error("refusing to start: %s", exc)
            return 2
        except ColdShutdown:
            log.warning("cold shutdown: exiting now; interrupted work resumes on restart")
            os._exit(130)
        finally:
            self.teardown()

    def loop_once(self) -> None:
        ingestor = self.kafka.ingestor
        # 1. keep the group membership while training: poll with partitions paused
        if self.worker.idle():
            ingestor.resume_all()
        else:
            ingestor.pause_all()
        ingestor.poll_once(timeout_ms=self.cfg.daemon.poll_timeout_ms)
        self._last_poll = time.monotonic()

    def request_stop(self) -> None:
        """Warm shutdown from any thread."""
        self._stop.set()
        self.worker.stop(timeout=0)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals += 1
        if self._signals == 1:
            log.warning("signal %d: warm shutdown (checkpoint, commit only what is registered)", signum)
            self.request_stop()
        else:
            raise ColdShutdown()

    # -- callbacks from the worker and the ingestor --------------------------------------------------
    def _sealed(self, source: str) -> None:
        self.metrics.stages.reached(source, "sealed", since=first_staged_at(self.spool, source))
        self.worker.submit(Job("train", source))

    def _registered(self, source: str) -> None:
        self.metrics.stages.reached(source, "registered")
        self.kafka.ingestor.mark_source_registered(source)

    def _dropped(self, source: str) -> None:
        self.metrics.stages.discard(source)
        self.kafka.ingestor.mark_source_dropped(source)

    def _control_done(self, origin: Origin) -> None:
        self.kafka.ingestor.mark_control_done(origin)

    def _training_failed(self, source: str, detail: str) -> None:
        self.kafka.ingestor.mark_training_failed(source, detail)

    def _control_failed(self, origin: Origin, detail: str) -> None:
        self.kafka.ingestor.mark_control_failed(origin, detail)

    def _tombstone(self, source: str) -> Tombstone | None:
        record = self.registry.tombstone(source)
        return tombstone_of(record) if record is not None else None

    def _on_control(self, cmd: ControlCommand, origin: Origin) -> None:
        if cmd.op in ("forget-source", "forget-samples") and not cmd.source:
            raise ValueError(f"{cmd.op} needs a source")  # dead-lettered as control-failed
        if cmd.op in FORGET_KINDS:
            self.metrics.forget_requests.labels(kind=cmd.op).inc()
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
        self.metrics.hotswap_last_success.set_to_current_time()
        for source in comp.sources if comp else ():
            self.metrics.stages.reached(source, "served")

    # -- health ---------------------------------------------------------------------------------------
    @property
    def http_port(self) -> int | None:
        """The health endpoint's bound port; None while it is not serving."""
        return self.http.port if any(s.name == "http" for s in self._started) else None

    def is_alive(self) -> bool:
        """The poll loop ran recently and the worker thread lives."""
        fresh = time.monotonic() - self._last_poll < max(30.0, 10 * self.cfg.daemon.poll_timeout_ms / 1000)
        return self.started.is_set() and fresh and self.worker.alive

    def check_readiness(self) -> Readiness:
        """Redis reachable, ingest not backing off, the registry watcher alive and current, a composition loaded
        (run by ``self.readiness``'s thread, every [daemon] readiness_refresh_s; /readyz answers from its last
        result)."""
        try:
            self.redis.ping()
        except redis.RedisError as exc:
            return Readiness(False, (f"redis unreachable at {redact_url(self.cfg.redis.url)}: {safe(exc)}",))
        if (problem := self.kafka.problem()) is not None:
            return Readiness(False, (f"ingest is backing off: {safe(problem)}",))
        ready, message = self.live.readiness()  # watcher alive and current, and something to serve
        if not ready:
            return Readiness(False, (safe(message),))
        comp = self.live.current()
        return Readiness(True, details={"detail": message, "epoch": comp.epoch if comp else None})

    def status(self) -> dict[str, Any]:
        comp = self.live.current()
        return {
            "daemon_id": self.daemon_id,
            "version": cdm.__version__,
            "epoch": comp.epoch if comp else None,
            "sources": list(comp.sources) if comp else [],
            "pending": list(comp.pending) if comp else [],
            "hotswap_error": safe(self.live.last_error) if self.live.last_error is not None else None,
            "watcher": dataclasses.asdict(self.live.status()),
            "worker": vars(self.worker.status),
        }

    def ui_local(self) -> LocalStatus:
        """What the status page (/ui) shows of this daemon alone: readiness, its job, queue and dead letters."""
        st = self.worker.status
        ready = self.readiness.current()
        progress: tuple[Progress, ...] = ()
        if st.job != "idle":
            progress = (
                Progress(
                    daemon_id=self.daemon_id,
                    job=st.job,
                    source=st.source,
                    step=st.step,
                    steps=st.steps,
                    loss=st.loss if st.steps and math.isfinite(st.loss) else None,
                    eta_s=st.eta_s(time.monotonic()),
                ),
            )
        return LocalStatus(
            ready=ready.ready,
            reasons=ready.reasons,
            problems=(f"last failed job: {safe(st.last_error, 300)}",) if st.last_error else (),
            progress=progress,
            queued_jobs=self.worker.pending(),
            dlq=self.dlq_counts(),
            facts={"daemon": self.daemon_id, "version": cdm.__version__},
        )

    def dlq_counts(self) -> dict[str, float]:
        """Records dead-lettered by this process since it started, by reason (from its metrics)."""
        return {
            sample.labels["reason"]: sample.value
            for metric in self.metrics.dlq_messages.collect()
            for sample in metric.samples
            if sample.name.endswith("_total") and "reason" in sample.labels
        }

    def _heartbeat_info(self) -> dict[str, Any]:
        status = self.worker.status
        return {
            **self.identity,
            "version": cdm.__version__,
            "http_port": self.http_port,
            "job": status.job,
            "source": status.source,
            "step": status.step,
            # training progress for the other replicas' and cdm serve's status pages
            "steps": status.steps,
            "loss": status.loss if status.steps and math.isfinite(status.loss) else None,
            "eta_s": status.eta_s(time.monotonic()),
        }

    def heartbeat(self) -> None:
        self.coordinator.heartbeat(self.daemon_id, self.cfg.daemon.heartbeat_ttl_s, self._heartbeat_info())


def open_spool(cfg: AppConfig) -> Spool:
    """The daemon's spool: locked to this process, with the configured limits and the model's compatibility
    check (a source that can never train is refused at its seal, not after a training run)."""
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


def ensure_topics(kafka: KafkaConfig) -> list[str]:
    """Create the sources, control and dead-letter topics if they are missing; returns those created."""
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
