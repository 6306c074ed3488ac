"""6. The service: ingest throughput, seal -> serving latency by stage, hot swap under load, forgetting end to end.

Real Redis + Kafka-protocol broker (deploy/local/services.py) and a real ``cdm daemon`` subprocess.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
import uuid
from pathlib import Path

from kafka import KafkaConsumer, KafkaProducer
from prometheus_client import CollectorRegistry

from bench.common import Profile, Result
from cdm.artifacts import ArtifactsConfig
from cdm.data import load_fashion_mnist
from daemon.config import KafkaConfig
from daemon.ingest import Ingestor
from daemon.metrics import Metrics
from daemon.producer import push_source, send_control
from daemon.spool import Spool, SpoolState
from daemon.wire import ControlCommand
from deploy.local import services
from registry.client import connect
from registry.config import RedisConfig
from registry.keys import Keys
from registry.reader import RegistryClient
from sampler.live import LiveComposition
from sampler.loader import CompositionLoader
from tests.daemon.daemon_harness import DaemonEnv, digit_sources


def ingest_throughput(bootstrap: str, root: Path, n: int) -> tuple[float, float, float]:
    """MB/s from Kafka into the spool (chunks staged durably + seal verified), in-process Ingestor."""
    data = load_fashion_mnist("train").subset(slice(0, n))
    prefix = f"ingest-{uuid.uuid4().hex[:6]}"
    cfg = KafkaConfig(
        bootstrap_servers=bootstrap,
        sources_topic=f"{prefix}.s",
        control_topic=f"{prefix}.c",
        dlq_topic=f"{prefix}.d",
        group_id=prefix,
        session_timeout_ms=6000,
        heartbeat_interval_ms=1000,
    )
    spool = Spool(root / "spool")
    sealed: list[str] = []
    consumer = KafkaConsumer(**cfg.consumer_kwargs())
    dlq = KafkaProducer(**cfg.producer_kwargs())
    ing = Ingestor(
        consumer, dlq, spool, Metrics(CollectorRegistry()), cfg, on_sealed=sealed.append, on_control=lambda *_: None
    )
    # 1. join the group first (~3 s on Tansu): that is not ingest work
    deadline = time.monotonic() + 60
    while not consumer.assignment() and time.monotonic() < deadline:
        ing.poll_once(200)
    # 2. push -> broker -> poll -> validate -> stage durably (fsync) -> seal verified
    t0 = time.perf_counter()
    producer = KafkaProducer(**cfg.producer_kwargs())
    rep = push_source(producer, cfg.sources_topic, "big", data, chunk_size=2000, progress=False)
    producer.close()
    deadline = time.monotonic() + 120
    while not sealed and time.monotonic() < deadline:
        ing.poll_once(200)
    secs = time.perf_counter() - t0
    consumer.close(autocommit=False)
    dlq.close()
    assert spool.state("big") is SpoolState.SEALED
    mb = rep.value_bytes / 1e6
    return mb, secs, mb / max(secs, 1e-9)


def run(p: Profile, out: Path) -> Result:
    r = Result(
        "service",
        "6. Service: Kafka -> spool -> compartment -> registry -> hot-swapped sampler",
        p,
        ["measure", "value", "unit"],
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        addrs = services.start(root / "services")
        try:
            mb, secs, rate = ingest_throughput(addrs.kafka_bootstrap, root, 20000 if p.name != "quick" else 4000)
            r.add(
                "ingest: push -> Kafka -> validated, staged (fsync), sealed in the spool",
                rate,
                f"MB/s ({mb:.1f} MB of npz chunks in {secs:.2f} s)",
            )
            env = DaemonEnv(
                root=root / "d",
                redis_url=addrs.redis_url,
                bootstrap=addrs.kafka_bootstrap,
                prefix=f"svc-{uuid.uuid4().hex[:6]}",
                namespace=f"svc-{uuid.uuid4().hex[:6]}",
                steps=p.service_steps,
                checkpoint_every=max(10, p.service_steps // 2),
            )
            env.start_daemon()
            try:
                _latencies(env, r)
            finally:
                env.stop_all()
            # the same forget with [router] kind = "density": no router, so nothing is trained
            density = DaemonEnv(
                root=root / "density",
                redis_url=addrs.redis_url,
                bootstrap=addrs.kafka_bootstrap,
                prefix=f"svd-{uuid.uuid4().hex[:6]}",
                namespace=f"svd-{uuid.uuid4().hex[:6]}",
                steps=p.service_steps,
                checkpoint_every=max(10, p.service_steps // 2),
            )
            os.environ["CDM_ROUTER__KIND"] = "density"  # the daemon's environment override of config.toml
            try:
                density.start_daemon()
            finally:
                del os.environ["CDM_ROUTER__KIND"]
            try:
                _density_forget(density, r)
            finally:
                density.stop_all()
        finally:
            services.stop(root / "services")
    r.notes.append(
        f"daemon config: 8x8 digits sources, {p.service_steps} compartment steps, router 30 steps, "
        "router debounce 0.5 s (tests/daemon/daemon_harness.py)."
    )
    return r


def _latencies(env: DaemonEnv, r: Result) -> None:
    src = digit_sources(3)
    names = list(src)
    client = connect(RedisConfig(), url=env.redis_url)
    reg = env.registry()
    env.push({names[0]: src[names[0]]})
    env.wait_serving({names[0]}, timeout=300)
    loader = CompositionLoader.from_config(
        ArtifactsConfig(), default_dir=env.root / "artifacts", base_dir=env.root / "sampler"
    )
    live = LiveComposition(RegistryClient(client, Keys(env.namespace)), loader, resync_s=0.2)
    swaps: list[tuple[float, tuple[str, ...]]] = []
    live._on_swap = lambda comp: swaps.append((time.time(), comp.sources if comp else ()))
    live.start()
    env.wait("the sampler", lambda: live.current() is not None, 60)
    # hot swap under load: a sampling loop runs while a new source is trained and swapped in
    stop = threading.Event()
    ok, failed = [0], [0]

    def loop() -> None:
        while not stop.is_set():
            try:
                live.sample(4, num_inference_steps=4)
                ok[0] += 1
            except Exception:  # counted, that is the measurement
                failed[0] += 1

    t = threading.Thread(target=loop)
    t.start()
    seal_at = time.time()
    env.push({names[1]: src[names[1]]})
    seal_at = time.time()
    env.wait_serving(set(names[:2]), timeout=300)
    env.wait("the swap", lambda: any(set(s) == set(names[:2]) for _, s in swaps), 60)
    stop.set()
    t.join(60)
    served_at = next(at for at, s in swaps if set(s) == set(names[:2]))
    events = reg.changes("0")
    rec = reg.snapshot().by_source()[names[1]]
    ev_training = next(e for e in events if e.kind == "training" and e.source == names[1])
    ev_active = next(e for e in events if e.kind == "activated" and e.source == names[1])
    ev_router = next(e for e in events if e.kind == "router" and e.at >= ev_active.at)
    train_s = float(rec.train_metrics.get("seconds", 0.0))
    r.add("seal -> serving, total", served_at - seal_at, "s")
    r.add("  queue (seal -> training starts)", ev_training.at - seal_at, "s")
    r.add("  train compartment", train_s, "s")
    r.add("  save + register (atomic epoch bump)", ev_active.at - ev_training.at - train_s, "s")
    r.add("  router retrain (debounced) + register", ev_router.at - ev_active.at, "s")
    r.add("  load + verify + swap in the sampler", served_at - ev_router.at, "s")
    r.add("sampling requests during the hot swap", ok[0] + failed[0], "requests")
    r.add("failed requests during the hot swap", failed[0], "requests (target 0)")
    # forgetting end to end (with two sources left, so the router really retrains)
    env.push({names[2]: src[names[2]]})
    env.wait_serving(set(names), timeout=300)
    producer = KafkaProducer(bootstrap_servers=env.bootstrap)
    t0 = time.time()
    send_control(producer, f"{env.prefix}.control", ControlCommand("forget-source", names[0], request_id="bench"))
    producer.close()
    env.wait_serving(set(names[1:]), timeout=300)
    env.wait(
        "the sampler without it",
        lambda: (comp := live.current()) is not None and set(comp.sources) == set(names[1:]),
        60,
    )
    r.add("forget-source request -> sampler without it", time.time() - t0, "s")
    live.stop()
    client.close()


def _density_forget(env: DaemonEnv, r: Result) -> None:
    """forget-source end to end with the density routing kind: retire, delete, bump the epoch, hot-swap."""
    src = digit_sources(3)
    names = list(src)
    client = connect(RedisConfig(), url=env.redis_url)
    reg = env.registry()
    env.push(src)
    env.wait_serving(set(names), timeout=300)
    loader = CompositionLoader.from_config(
        ArtifactsConfig(), default_dir=env.root / "artifacts", base_dir=env.root / "sampler"
    )
    live = LiveComposition(RegistryClient(client, Keys(env.namespace)), loader, resync_s=0.2)
    live.start()
    try:
        env.wait(
            "the sampler",
            lambda: (comp := live.current()) is not None and set(comp.sources) == set(names),
            120,
        )
        assert reg.routing() == "density", "the daemon was meant to run the density kind"
        producer = KafkaProducer(bootstrap_servers=env.bootstrap)
        t0 = time.time()
        send_control(producer, f"{env.prefix}.control", ControlCommand("forget-source", names[0], request_id="bd"))
        producer.close()
        env.wait_serving(set(names[1:]), timeout=300)
        registry_s = time.time() - t0
        env.wait(
            "the sampler without it",
            lambda: (comp := live.current()) is not None and set(comp.sources) == set(names[1:]),
            60,
        )
        r.add(
            'forget-source request -> sampler without it, [router] kind = "density" (target < 2 s)',
            time.time() - t0,
            "s",
        )
        r.add("  of which: request -> registry without it (retire, delete, epoch bump; no training)", registry_s, "s")
    finally:
        live.stop()
        client.close()
