"""``make demo``: the whole product on this machine in a few minutes.

1. start Redis + a Kafka-protocol broker on free loopback ports (deploy/local/services.py)
2. start ``cdm daemon`` as a separate process
3. push four Fashion-MNIST sources (tops, trousers, footwear, bags) with the producer ``cdm push`` uses
4. wait until each compartment and the router are registered and served (progress from the daemon's heartbeat)
5. sample a PNG grid with attribution from the live registry
6. start ``cdm serve`` (the HTTP sampler): two principals, one sees every source, one only the sources tagged
   tenant=acme; the restricted one gets the same answer for a forbidden source as for one that does not exist;
   print the curl lines a user would type
7. forget "bags" through the control topic; sample again with the same seed; print what changed (``cdm serve``
   follows: bags leaves its /v1/sources without a restart)
8. stop the server, the daemon (warm) and the services it started
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from cli.config import render_config
from common.redact import redact_url

OUT = Path("demo-out")
# Fashion-MNIST classes: 0 T-shirt, 1 trouser, 2 pullover, 3 dress, 4 coat, 5 sandal, 6 shirt, 7 sneaker, 8 bag, 9 boot
SOURCES = {"tops": [0, 2, 3, 4, 6], "trousers": [1], "footwear": [5, 7, 9], "bags": [8]}
FORGET = "bags"
ACME = ("tops", "trousers")  # tagged tenant=acme: what the restricted principal sees


def demo_config(
    *, steps: int, router_steps: int, bootstrap: str, redis_url: str, run: str, out: Path, serve_port: int
) -> str:
    """The demo's config.toml: small model and runs, the local services, its own Redis namespace and directories."""
    doc: dict[str, dict[str, Any]] = {
        "model": {"sample_size": 16, "block_out_channels": [32, 64]},
        "train": {"steps": steps, "batch_size": 64, "warmup_steps": 20, "lr": 2e-3, "checkpoint_every": 100},
        "router": {"steps": router_steps, "batch_size": 128},
        "sample": {"num_inference_steps": 20, "scheduler": "dpm"},
        "kafka": {"bootstrap_servers": bootstrap, "session_timeout_ms": 6000, "heartbeat_interval_ms": 1000},
        "redis": {"url": redis_url, "namespace": f"cdm-demo-{run}"},
        "serve": {"port": serve_port, "max_n": 20, "resync_s": 1},
        "daemon": {
            "artifact_dir": out / "artifacts",
            "spool_dir": out / "spool",
            "http_port": 0,
            "router_debounce_s": 2,
            "poll_timeout_ms": 200,
        },
    }
    return render_config(doc, comment="written by `make demo` (scripts/demo.py); see config.toml for every key")


def _terminate(proc: subprocess.Popen[bytes] | None, *, wait_s: float) -> None:
    """SIGTERM a child that is still running; SIGKILL it after ``wait_s`` seconds."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(wait_s)
    except subprocess.TimeoutExpired:
        proc.kill()


def _say(msg: str) -> None:
    print(msg, flush=True)


def build_sources(per_source: int, seed: int) -> dict[str, Any]:
    from cdm.data import load_fashion_mnist

    data = load_fashion_mnist("train")
    assert data.labels is not None
    rng = np.random.default_rng(seed)
    out = {}
    for name, classes in SOURCES.items():
        idx = np.flatnonzero(np.isin(data.labels, classes))
        out[name] = data.subset(np.sort(rng.choice(idx, size=min(per_source, len(idx)), replace=False)))
    return out


def wait_serving(
    registry: Any, coordinator: Any, want: set[str], daemon: subprocess.Popen[bytes], log: Path, timeout: float
) -> Any:
    """Poll the registry until exactly ``want`` is active and routed; show the daemon's training progress."""
    bar = tqdm(total=len(want), desc="compartments serving", unit="source", dynamic_ncols=True, mininterval=2)
    last = ""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if daemon.poll() is not None:
                raise SystemExit(f"the daemon exited ({daemon.returncode}); see {log}")
            snap = registry.snapshot()
            active = {c.source for c in snap.compartments}
            routed = set(snap.router.compartment_ids) if snap.router else set()
            bar.update(len(active & want) - bar.n)
            work = [d.info for d in coordinator.live_daemons()]
            job = work[0] if work else {}
            status = f"epoch {snap.epoch} | {job.get('job', '?')} {job.get('source', '')} step {job.get('step', 0)}"
            if status != last:
                bar.set_postfix_str(status, refresh=False)
                bar.update(0)
                last = status
            if active == want and routed == set(snap.compartment_ids):
                return snap
            time.sleep(0.5)
    finally:
        bar.close()
    raise SystemExit(f"timed out waiting for {sorted(want)}; see {log}")


def sample(cfg: Any, redis_url: str, n: int, seed: int, png: Path) -> Any:
    from cdm.artifacts import ArtifactsConfig
    from cdm.pipeline import CompartmentalPipeline, make_scheduler
    from cdm.viz import save_grid
    from sampler.loader import load_live_composition

    den, model = load_live_composition(
        cfg.redis,
        ArtifactsConfig(),  # the daemon's local artifact directory is the store
        url=redis_url,
        default_dir=Path(cfg.daemon.artifact_dir),
        base_dir=cfg.cache_base_dir,
        vectorize=cfg.library.sample.vectorize,
    )
    pipe = CompartmentalPipeline(den, make_scheduler(cfg.library.sample.scheduler, model))
    # one class per grid column (0 T-shirt ... 9 boot): the router's P(source | x_t, t, c) picks the compartment
    out = pipe(
        batch_size=n,
        class_labels=[i % 10 for i in range(n)],
        num_inference_steps=cfg.library.sample.num_inference_steps,
        generator=torch.Generator().manual_seed(seed),
        progress=True,
        guidance_scale=cfg.library.sample.guidance_scale,
    )
    save_grid(out.images, png, nrow=10, attribution=out.attribution, source_names=out.source_names)
    return out


def cdm(cfg_path: Path, *argv: str) -> str:
    """Run ``cdm --config CFG ARGV`` as a user would (printed first); its stdout."""
    _say(f"   $ cdm {shlex.join(argv)}")
    done = subprocess.run(
        [sys.executable, "-m", "cli", "--config", str(cfg_path), *argv], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"cdm {shlex.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def http(method: str, url: str, token: str | None = None, body: dict[str, Any] | None = None) -> tuple[int, Any, bytes]:
    """(status, headers, body) of one request to ``cdm serve`` (standard library only)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read()


def wait_ready(url: str, server: subprocess.Popen[bytes], log: Path, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"cdm serve exited ({server.returncode}); see {log}")
        try:
            status, _, body = http("GET", f"{url}/readyz")
            if status == 200:
                return dict(json.loads(body))
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"cdm serve was not ready within {timeout:.0f}s; see {log}")


def serve_demo(cfg_path: Path, url: str, out: Path, n: int, seed: int) -> dict[str, Any]:
    """Two principals over HTTP; returns the admin token and what each saw."""
    _say("   tags and grants live in the registry's Redis (`cdm acl`), tokens are stored hashed (`cdm token`):")
    for source in ACME:
        cdm(cfg_path, "acl", "tag", source, "tenant=acme")
    cdm(cfg_path, "acl", "grant", "admin", "--all")
    cdm(cfg_path, "acl", "grant", "acme", "--tag", "tenant=acme")
    admin = json.loads(cdm(cfg_path, "token", "create", "admin", "--label", "demo", "--json"))["token"]
    acme = json.loads(cdm(cfg_path, "token", "create", "acme", "--label", "demo", "--json"))["token"]
    body = {"n": n, "labels": [i % 10 for i in range(n)], "seed": seed, "format": "png"}
    seen: dict[str, Any] = {"admin_token": admin}
    for who, token in (("admin", admin), ("acme", acme)):
        status, headers, png = http("POST", f"{url}/v1/samples", token, body)
        if status != 200:
            raise SystemExit(f"POST /v1/samples as {who} answered {status}: {png[:300]!r}")
        path = out / f"serve-{who}.png"
        path.write_bytes(png)
        seen[who] = headers["X-CDM-Sources"].split(",")
        _say(f"   {who:5s} -> 200, epoch {headers['X-CDM-Epoch']}, composed from {seen[who]} -> {path}")
    forbidden = http("POST", f"{url}/v1/samples", acme, {"n": 1, "sources": [FORGET]})
    missing = http("POST", f"{url}/v1/samples", acme, {"n": 1, "sources": ["hats"]})
    _say(f"   acme asks for {FORGET!r} (exists, not granted): {forbidden[0]} {forbidden[2].decode()}")
    _say(f"   acme asks for 'hats' (does not exist):        {missing[0]} {missing[2].decode()}")
    same = forbidden[0] == missing[0] and forbidden[2] == missing[2]
    _say(f"   identical status and body: {same}")
    if not same:
        raise SystemExit("a forbidden source must answer exactly like a missing one")
    seen["indistinguishable"] = same
    _say("   what a user types (the token comes from `cdm token create`):")
    _say(f"     export CDM_TOKEN={acme}")
    _say(f'     curl -s -H "Authorization: Bearer $CDM_TOKEN" {url}/v1/sources')
    _say(
        f"     curl -s -H \"Authorization: Bearer $CDM_TOKEN\" -H 'Content-Type: application/json' "
        f'-d \'{{"n": 8, "labels": [7], "format": "png"}}\' -o grid.png {url}/v1/samples'
    )
    _say(f'     curl -s -H "Authorization: Bearer $CDM_TOKEN" -F image=@my-image.png {url}/v1/attribute')
    _say(f"     curl -s {url}/metrics | grep cdm_serve_requests_total")
    return seen


def shares(out: Any) -> dict[str, float]:
    """Fraction of samples whose dominant source (largest mean router weight) is each source."""
    dominant = out.attribution.argmax(1)
    return {n: round(float((dominant == i).mean()), 3) for i, n in enumerate(out.source_names)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per compartment")
    p.add_argument("--router-steps", type=int, default=300)
    p.add_argument("--per-source", type=int, default=3000, help="images per source")
    p.add_argument("--n", type=int, default=60, help="images per sample grid (column j shows class j)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--timeout", type=float, default=1800)
    args = p.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the `finally` below stops the daemon and the services
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))

    from daemon.config import load_config
    from daemon.producer import push_source, send_control
    from daemon.wire import ControlCommand
    from deploy.local import services
    from registry.client import connect
    from registry.coordination import Coordinator
    from registry.keys import Keys
    from registry.reader import RegistryClient

    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    # each run has its own Redis namespace, so it starts from empty daemon state too: a previous run's spool and
    # artifacts belong to that run's registry
    for stale in ("spool", "artifacts", ".cache"):
        shutil.rmtree(out / stale, ignore_errors=True)
    started = time.perf_counter()
    # 1. services
    _say("== 1. starting Redis and the Kafka-protocol broker on free loopback ports")
    state = out / "services"
    addrs = services.start(state)
    _say(f"   redis {redact_url(addrs.redis_url)}   kafka {addrs.kafka_bootstrap}")
    daemon: subprocess.Popen[bytes] | None = None
    server: subprocess.Popen[bytes] | None = None
    log = out / "daemon.log"
    serve_log = out / "serve.log"
    try:
        run = str(int(time.time()))
        serve_port = services.free_port()
        text = demo_config(
            steps=args.steps,
            router_steps=args.router_steps,
            bootstrap=addrs.kafka_bootstrap,
            redis_url=addrs.redis_url,
            run=run,
            out=out,
            serve_port=serve_port,
        )
        cfg_path = out / "config.toml"
        cfg_path.write_text(text)
        cfg = load_config(cfg_path)
        # 2. daemon
        _say(f"== 2. starting `cdm daemon --config {cfg_path}` (log: {log})")
        with open(log, "ab") as logf:
            daemon = subprocess.Popen(
                [sys.executable, "-m", "cli", "--config", str(cfg_path), "daemon"],
                stdout=logf,
                stderr=subprocess.STDOUT,
            )
        client = connect(cfg.redis)
        keys = Keys(cfg.redis.namespace)
        registry, coordinator = RegistryClient(client, keys), Coordinator(client, keys)
        # 3. push sources
        _say(f"== 3. pushing {len(SOURCES)} Fashion-MNIST sources ({args.per_source} images each) to Kafka")
        sources = build_sources(args.per_source, args.seed)
        from kafka import KafkaProducer

        from daemon.service import ensure_topics

        ensure_topics(cfg.kafka)  # the daemon creates them too; whoever comes first wins
        producer = KafkaProducer(**cfg.kafka.producer_kwargs())
        for name, data in sources.items():
            rep = push_source(producer, cfg.kafka.sources_topic, name, data, chunk_size=1000, progress=False)
            _say(f"   {name:9s} {rep.n_samples} images in {rep.chunks} chunks -> partition {rep.partition}")
        # 4. wait until served
        _say(f"== 4. the daemon trains one compartment per source ({args.steps} steps each), then the router")
        snap = wait_serving(registry, coordinator, set(SOURCES), daemon, log, args.timeout)
        acc = snap.router.metrics.get("accuracy") if snap.router else None
        _say(
            f"   serving epoch {snap.epoch}: {[c.compartment_id for c in snap.compartments]}, "
            f"router held-out accuracy {acc:.3f}"
            if acc is not None
            else f"   serving epoch {snap.epoch}"
        )
        # 5. sample
        before_png = out / "grid-before.png"
        _say(f"== 5. sampling {args.n} images from the live registry -> {before_png}")
        before = sample(cfg, addrs.redis_url, args.n, args.seed, before_png)
        _say(f"   share of samples by dominant source: {shares(before)}")
        # 6. cdm serve
        url = f"http://127.0.0.1:{serve_port}"
        _say(f"== 6. starting `cdm serve --config {cfg_path}` on {url} (log: {serve_log})")
        with open(serve_log, "ab") as logf:
            server = subprocess.Popen(
                [sys.executable, "-m", "cli", "--config", str(cfg_path), "serve"], stdout=logf, stderr=subprocess.STDOUT
            )
        ready = wait_ready(url, server, serve_log, 120)
        _say(f"   ready: {ready['reason']}")
        served = serve_demo(cfg_path, url, out, min(args.n, 20), args.seed)
        # 7. forget
        _say(f"== 7. forgetting {FORGET!r} through the control topic")
        t0 = time.perf_counter()
        send_control(producer, cfg.kafka.control_topic, ControlCommand("forget-source", FORGET, request_id="demo"))
        producer.close()
        after_snap = wait_serving(registry, coordinator, set(SOURCES) - {FORGET}, daemon, log, args.timeout)
        deadline = time.monotonic() + args.timeout
        receipt = registry.receipt("demo")  # written once the request is complete (its deletes come after the swap)
        while receipt is None and time.monotonic() < deadline and daemon.poll() is None:
            time.sleep(0.2)
            receipt = registry.receipt("demo")
        _say(f"   done in {time.perf_counter() - t0:.1f}s: epoch {snap.epoch} -> {after_snap.epoch}")
        if receipt:
            _say(
                f"   receipt: retired {receipt['retired']}, {len(receipt['deleted_files'])} files deleted, "
                f"router {receipt['router_before']} -> {receipt['router_after']}, "
                f"untouched {sorted(receipt['untouched'])}"
            )
        after_png = out / "grid-after.png"
        after = sample(cfg, addrs.redis_url, args.n, args.seed, after_png)
        _say(f"   share of samples by dominant source: {shares(after)}  -> {after_png}")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # cdm serve follows the registry by itself (pub/sub + resync)
            status, _, body = http("GET", f"{url}/v1/sources", served["admin_token"])
            listed = [x["name"] for x in json.loads(body)["sources"]] if status == 200 else []
            if status == 200 and FORGET not in listed:
                break
            time.sleep(0.5)
        epoch_now = json.loads(body)["epoch"] if status == 200 else None
        _say(f"   cdm serve, no restart: admin's GET /v1/sources now lists {listed} (epoch {epoch_now})")
        summary = {
            "seconds": round(time.perf_counter() - started, 1),
            "before": {
                "epoch": snap.epoch,
                "sources": before.source_names,
                "shares": shares(before),
                "png": str(before_png),
            },
            "after": {
                "epoch": after_snap.epoch,
                "sources": after.source_names,
                "shares": shares(after),
                "png": str(after_png),
            },
            "forget_receipt": receipt,
            "serve": {
                "url": url,
                "admin_sources": served["admin"],
                "acme_sources": served["acme"],
                "forbidden_equals_missing": served["indistinguishable"],
                "sources_after_forget": listed,
            },
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        _say(
            f"== done in {summary['seconds']}s. What changed: {FORGET!r} left the composition "
            f"({len(before.source_names)} -> {len(after.source_names)} sources), no other compartment was "
            f"retrained. Grids: {before_png}, {after_png}; summary: {out / 'summary.json'}"
        )
        client.close()
        return 0
    finally:
        # 8. stop what we started, in reverse order
        _terminate(server, wait_s=30)
        _terminate(daemon, wait_s=60)  # warm shutdown: it may be checkpointing
        services.stop(state)
        _say("   server, daemon and services stopped")


if __name__ == "__main__":
    sys.exit(main())
