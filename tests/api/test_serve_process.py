"""``cdm serve`` as a real process (uvicorn on a free port) over the real test Redis: it follows the registry by
itself, and after a forget-source no response at or after the forget's epoch uses the forgotten source, under load.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis

from deploy.local import services
from registry.acl import AccessRegistry, Grant
from registry.keys import Keys
from registry.writer import Registry
from tests.api.conftest import TAGS, Trained, register

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Process:
    url: str
    log: Path


@pytest.fixture
def cdm_serve(
    tmp_path: Path, trained: Trained, redis_client: redis.Redis, redis_db_url: str, redis_namespace: str
) -> Iterator[Process]:
    keys = Keys(redis_namespace)
    register(Registry(redis_client, keys), trained)
    access = AccessRegistry(redis_client, keys)
    for source, tags in TAGS.items():
        access.set_tags(source, tags)
    port = services.free_port()
    cfg = tmp_path / "config.toml"
    cfg.write_text(
        f"""
[redis]
url = "{redis_db_url}"
namespace = "{redis_namespace}"
[sample]
num_inference_steps = 2
scheduler = "ddim"
vectorize = "loop"
[daemon]
artifact_dir = "{trained.router_dir.parent}"
[serve]
port = {port}
max_n = 4
max_steps = 4
max_concurrent = 8
sampling_threads = 2
resync_s = 0.2
"""
    )
    # run in a directory without config.toml or .services, so only --config counts
    server = services.cdm_serve(tmp_path / "serve", cfg, port, env={"PYTHONPATH": str(REPO)})
    with server.start(timeout_s=120):
        yield Process(f"http://127.0.0.1:{port}", server.log)


@dataclass(frozen=True)
class Outcome:
    started: float
    status: int
    epoch: int
    sources: tuple[str, ...]


@pytest.mark.slow
def test_no_response_at_or_after_the_forget_epoch_uses_the_forgotten_source(
    cdm_serve: Process, redis_client: redis.Redis, redis_namespace: str
) -> None:
    keys = Keys(redis_namespace)
    reg = Registry(redis_client, keys)
    token = AccessRegistry(redis_client, keys).create_token("loader").token
    AccessRegistry(redis_client, keys).grant("loader", [Grant("all")])
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    stop = threading.Event()
    errors: list[str] = []

    def client(i: int) -> None:
        with httpx.Client(base_url=cdm_serve.url, timeout=60, headers={"Authorization": f"Bearer {token}"}) as c:
            k = 0
            while not stop.is_set() and k < 400:  # bounded: at most 400 requests per client
                k += 1
                started = time.monotonic()
                try:
                    r = c.post("/v1/samples", json={"n": 1, "seed": i * 1000 + k})
                except httpx.HTTPError as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                doc = r.json() if r.status_code == 200 else {}
                if r.status_code == 200:
                    assert int(r.headers["X-CDM-Epoch"]) == doc["epoch"]
                with lock:
                    outcomes.append(
                        Outcome(started, r.status_code, int(doc.get("epoch", -1)), tuple(doc.get("sources", ())))
                    )

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(4)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 60
        while sum(o.status == 200 for o in outcomes) < 8 and time.monotonic() < deadline:
            time.sleep(0.1)
        # forget beta through the registry while the clients keep sampling
        receipt = reg.forget_source("beta", "forget under load")
        forgotten_at = time.monotonic()
        while time.monotonic() < deadline:
            after = [o for o in outcomes if o.epoch >= receipt.epoch]
            if len(after) >= 12 and time.monotonic() - forgotten_at > 2:
                break
            time.sleep(0.1)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not errors, errors[:5]
    assert outcomes and all(o.status == 200 for o in outcomes), {o.status for o in outcomes}
    before = [o for o in outcomes if o.epoch < receipt.epoch]
    after = [o for o in outcomes if o.epoch >= receipt.epoch]
    assert any("beta" in o.sources for o in before), "beta was served before the forget (or the test shows nothing)"
    assert len(after) >= 12, f"the server never swapped to epoch {receipt.epoch}; see {cdm_serve.log}"
    assert all(o.sources == ("alpha", "gamma") for o in after), {o.sources for o in after}
    # stronger: nothing that started after the forget returned used beta, swapped or not
    late = [o for o in outcomes if o.started > forgotten_at]
    assert late and all("beta" not in o.sources for o in late)
    # the process serves /metrics and its schema too
    metrics = httpx.get(f"{cdm_serve.url}/metrics", timeout=10).text
    assert f"cdm_serve_epoch {float(receipt.epoch)}" in metrics and "cdm_serve_hotswap_seconds_count" in metrics
    assert "/v1/samples" in httpx.get(f"{cdm_serve.url}/openapi.json", timeout=10).json()["paths"]


def test_sample_threads_sets_torchs_threads_of_the_serving_process(tmp_path: Path, redis_db_url: str) -> None:
    import torch

    from cli.serve import build_app
    from daemon.config import parse_config

    cfg = parse_config(
        {
            "sample": {"threads": 1},
            "daemon": {"artifact_dir": str(tmp_path / "artifacts")},
            "redis": {"url": redis_db_url},
        }
    )
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        build_app(cfg, redis_url=redis_db_url)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
