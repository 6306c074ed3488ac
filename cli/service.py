"""Service commands of ``cdm``: daemon, push, control, services, and ``ls`` over the live registry."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cli.config import DEFAULT_SERVICES, Subparsers, app_config
from cli.errors import KAFKA_HINT, check_reachable
from common.names import SOURCE_NAME_RULE
from daemon.config import AppConfig, KafkaConfig

if TYPE_CHECKING:
    from kafka import KafkaProducer

    from registry.records import CompartmentRecord, RouterRecord


def register(sub: Subparsers) -> None:
    """Add the service subcommands to the ``cdm`` parser."""
    d = sub.add_parser(
        "daemon",
        help="run the continual-learning daemon (Kafka -> compartments -> Redis registry)",
        description="Consume sources from Kafka, train one compartment per sealed source, register it in Redis "
        "and hot-swap the composed sampler. SIGTERM: warm shutdown (checkpoint, commit only what is registered); "
        "a second SIGTERM exits at once. /metrics, /healthz and /readyz are served on [daemon] http_port.",
    )
    _services_flag(d)
    d.add_argument("--progress", action="store_true", help="training progress bars on stderr")
    d.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    d.set_defaults(func=cmd_daemon)

    p = sub.add_parser(
        "push",
        help="publish a source (.npz) to Kafka for the daemon to train",
        description="Send PATH.npz as source NAME: chunks of --chunk-size samples, then a seal with the data's "
        "fingerprint. The daemon trains a compartment once the seal arrives.",
    )
    p.add_argument("--source", required=True, help=f"source id: {SOURCE_NAME_RULE}")
    p.add_argument("path", type=Path, help=".npz with images uint8 (N,H,W[,C]) and optional labels, ids")
    p.add_argument("--chunk-size", type=int, default=2000, help="samples per Kafka message")
    p.add_argument(
        "--claim-check-dir",
        type=Path,
        default=None,
        help="write oversized chunks here and send file:// pointers (must be under the daemon's spool root)",
    )
    _services_flag(p)
    p.set_defaults(func=cmd_push)

    c = sub.add_parser(
        "control",
        help="send a control command (forget-source, forget-samples, retrain-router)",
        description="Publish a command on the control topic; the daemon executes it and records a receipt in the "
        "registry's audit log (see `cdm ls --json`).",
    )
    c.add_argument("op", choices=["forget-source", "forget-samples", "retrain-router"])
    c.add_argument("--source", default=None)
    c.add_argument("--samples", default=None, help="comma-separated sample ids (forget-samples)")
    c.add_argument("--request-id", default=None)
    _services_flag(c)
    c.set_defaults(func=cmd_control)

    s = sub.add_parser("services", help="start/stop the local Redis + Kafka-protocol broker (development, tests)")
    s.add_argument("action", choices=["start", "stop", "status"])
    s.add_argument(
        "--state-dir",
        type=Path,
        default=DEFAULT_SERVICES.parent,
        help="where services.json and the servers' data live (default ./.services, where the other commands look)",
    )
    s.set_defaults(func=cmd_services)


def _services_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--services",
        type=Path,
        default=None,
        help="services.json of deploy/local (Kafka/Redis addresses); default .services/services.json if present",
    )


def cmd_daemon(args: argparse.Namespace) -> int:
    from common.redact import install_log_redaction
    from daemon.service import Service

    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    install_log_redaction()  # every line: URLs without credentials, bounded length
    if args.log_level != "DEBUG":
        logging.getLogger("apscheduler").setLevel(logging.WARNING)  # one line per job run is noise
    cfg = app_config(args)
    return Service(cfg, progress=args.progress).run()


def _producer(cfg: KafkaConfig) -> KafkaProducer:
    """A producer on ``[kafka] bootstrap_servers``; a broker that cannot be reached is a ``ServiceUnreachable``
    naming the addresses tried, after a few seconds (kafka-python alone waits ~40 s, then raises a bare timeout)."""
    from kafka import KafkaProducer

    check_reachable("the Kafka broker", cfg.bootstrap_servers, KAFKA_HINT)
    return KafkaProducer(**cfg.producer_kwargs())


def cmd_push(args: argparse.Namespace) -> int:
    from cdm.data import load_npz
    from daemon.producer import push_source

    cfg = app_config(args)
    data = load_npz(args.path)
    producer = _producer(cfg.kafka)
    try:
        report = push_source(
            producer,
            cfg.kafka.sources_topic,
            args.source,
            data,
            chunk_size=args.chunk_size,
            claim_check_dir=args.claim_check_dir,
        )
    finally:
        producer.close()
    print(json.dumps(asdict(report)))
    return 0


def cmd_control(args: argparse.Namespace) -> int:
    from daemon.producer import send_control
    from daemon.wire import ControlCommand

    cfg = app_config(args)
    ids = tuple(int(v) for v in args.samples.split(",") if v.strip()) if args.samples else ()
    cmd = ControlCommand(op=args.op, source=args.source, sample_ids=ids, request_id=args.request_id)
    producer = _producer(cfg.kafka)
    try:
        origin = send_control(producer, cfg.kafka.control_topic, cmd)
    finally:
        producer.close()
    print(
        json.dumps(
            {
                "op": args.op,
                "source": args.source,
                "topic": origin.topic,
                "partition": origin.partition,
                "offset": origin.offset,
            }
        )
    )
    return 0


def cmd_services(args: argparse.Namespace) -> int:
    from deploy.local import services

    return int(services.main([args.action, "--state-dir", str(args.state_dir)]) or 0)


def cmd_ls_registry(args: argparse.Namespace, cfg: AppConfig) -> int:
    """``cdm ls`` over the live registry of ``cfg`` (``--redis`` replaces its url)."""
    from registry.client import connect
    from registry.coordination import Coordinator
    from registry.keys import Keys
    from registry.reader import RegistryClient

    client = connect(cfg.redis, url=args.redis)
    try:
        keys = Keys(cfg.redis.namespace)
        reg = RegistryClient(client, keys)
        snap = reg.snapshot()
        doc = {
            "epoch": snap.epoch,
            "compartments": [_record(c) for c in snap.compartments],
            "router": _record(snap.router) if snap.router else None,
            "daemons": [{"daemon_id": d.daemon_id, "info": d.info} for d in Coordinator(client, keys).live_daemons()],
            "audit": reg.audit(20),
        }
    finally:
        client.close()
    if args.json:
        print(json.dumps(doc, default=str))
    else:
        print(f"epoch {doc['epoch']}")
        for c in snap.compartments:
            print(f"  {c.compartment_id:24s} n={c.n_samples:6d} prior={c.prior:.3f} {c.artifact_uri}")
        if snap.router:
            print(f"  router {snap.router.router_id} over {list(snap.router.compartment_ids)}")
    return 0


def _record(rec: CompartmentRecord | RouterRecord) -> dict[str, Any]:
    d = asdict(rec)
    if "status" in d:
        d["status"] = str(d["status"])
    return d
