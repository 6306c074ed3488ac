"""``/ui`` on ``cdm serve`` and on the daemon's health app, through httpx over the REAL test Redis.

The browser test (tests/api/test_ui_browser.py) loads the same pages in Chromium; this file checks what a page
contains, who may see what, how a browser user signs in, and what happens with the registry down.
"""

from __future__ import annotations

import base64
import io
import re
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
from PIL import Image
from prometheus_client import CollectorRegistry
from starlette.testclient import TestClient

from api.app import create_app
from api.auth import Authenticator
from api.config import ServeConfig
from api.health import create_health_app
from api.ui import GridCache, GridSpec, LocalStatus, Progress, StatusPage
from api.ui.collect import refresh_of
from cdm.artifacts import ArtifactsConfig
from cdm.viz import source_colour, source_colour_hex
from daemon.metrics import Metrics
from registry.acl import AccessRegistry, Grant, new_token
from registry.coordination import Coordinator
from registry.keys import Keys
from registry.reader import RegistryClient
from sampler.live import LiveComposition
from sampler.loader import CompositionLoader
from tests.api.conftest import FAST, SOURCES, Served, auth, forget_with_receipt

SPEC = GridSpec(n=4, steps=2)


@pytest.fixture
def grids() -> Iterator[GridCache]:
    cache = GridCache(SPEC)
    yield cache
    cache.close()


def dead_redis() -> redis.Redis:
    """A client of a port nothing listens on (the registry down)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5, socket_timeout=0.5)


def wait_for_grid(s: Served, grids: GridCache, sources: tuple[str, ...]) -> None:
    comp = s.live.current()
    assert comp is not None
    assert grids.wait(comp, sources, timeout=120).state == "ready"


def swatches(html: str) -> dict[str, str]:
    """source name -> the colour of its swatch, for every swatch on the page (they must agree)."""
    found: dict[str, set[str]] = {}
    for colour, name in re.findall(r'<span class="swatch" style="background: (#[0-9a-f]{6})"></span>([^<]+)<', html):
        found.setdefault(name, set()).add(colour)
    assert all(len(c) == 1 for c in found.values()), found
    return {name: next(iter(c)) for name, c in found.items()}


def section(html: str, section_id: str) -> str:
    m = re.search(rf'<section class="card[^"]*" id="{section_id}">(.*?)</section>', html, re.S)
    assert m, f"the page has no {section_id} section"
    return m.group(1)


def grid_colours(html: str) -> set[tuple[int, int, int]]:
    """Every colour of the page's inline grid PNG."""
    m = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert m, "the page has no inline grid"
    with Image.open(io.BytesIO(base64.b64decode(m.group(1)))) as im:
        pixels = np.asarray(im.convert("RGB")).reshape(-1, 3)
    return {(int(r), int(g), int(b)) for r, g, b in np.unique(pixels, axis=0)}


# ------------------------------------------------------------------------------------------ cdm serve


def test_serve_ui_shows_only_the_callers_sources_with_their_colours(
    serve: Callable[..., Served], grids: GridCache, redis_client: redis.Redis, redis_namespace: str
) -> None:
    s = serve(grids=grids)
    tok = s.token("bob", "source:alpha", "tag:license=cc-by")  # alpha and beta, never gamma
    daemons = Coordinator(redis_client, Keys(redis_namespace))
    daemons.heartbeat("d-0", 30, {"job": "train", "source": "gamma", "step": 3, "steps": 9})
    daemons.heartbeat("d-1", 30, {"job": "retrain-router", "source": "", "step": 4, "steps": 8})
    first = s.client.get("/ui", headers=auth(tok))
    assert first.status_code == 200 and first.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in first.headers["content-security-policy"]
    assert "drawing the grid of epoch" in first.text  # queued, not drawn by the request
    wait_for_grid(s, grids, ("alpha", "beta"))
    r = s.client.get("/ui", headers=auth(tok))
    page = r.text
    assert 'id="principal">bob<' in page and f'id="served-epoch">{s.registry.epoch()}<' in page
    assert "gamma" not in page  # not in the tables, the history, the legend, the grid's names or the progress
    assert "4 / 8" in section(page, "progress") and "3 / 9" not in page  # the router's job concerns everyone
    assert swatches(page) == {"alpha": source_colour_hex("alpha"), "beta": source_colour_hex("beta")}
    assert page.count('class="state active">active<') >= 2
    assert '<meta http-equiv="refresh" content="10">' in page
    # the grid's bars are drawn in the same colours as the page's swatches
    colours = grid_colours(page)
    assert source_colour("alpha") in colours and source_colour("beta") in colours
    assert source_colour("gamma") not in colours
    # someone granted every source sees gamma too; ?refresh=0 turns the auto-refresh off
    everything = s.client.get("/ui?refresh=0", headers=auth(s.token("carol", "all"))).text
    assert set(swatches(everything)) == set(SOURCES) and 'http-equiv="refresh"' not in everything


def test_a_browser_signs_in_with_its_token_and_the_cookie_opens_only_the_ui(serve: Callable[..., Served]) -> None:
    s = serve()
    tok = s.token("bob", "source:alpha")
    # 1. no token: 401 with the sign-in form
    r = s.client.get("/ui")
    assert r.status_code == 401 and '<form method="post" action="/ui/login">' in r.text
    assert s.client.get("/ui/login").status_code == 200
    # 2. a wrong token is refused, a right one sets the cookie and redirects to /ui
    bad = s.client.post("/ui/login", data={"token": "cdm_nope"}, follow_redirects=False)
    assert bad.status_code == 401 and "not valid" in bad.text and "set-cookie" not in bad.headers
    ok = s.client.post("/ui/login", data={"token": tok}, follow_redirects=False)
    assert ok.status_code == 303 and ok.headers["location"] == "/ui"
    cookie = ok.headers["set-cookie"]
    assert cookie.startswith("cdm_ui=") and "HttpOnly" in cookie and "SameSite=strict" in cookie
    assert "Path=/ui" in cookie and "Max-Age=43200" in cookie
    page = s.client.get("/ui")  # the client keeps the cookie
    assert page.status_code == 200 and 'id="principal">bob<' in page.text and "log out" in page.text
    # 3. the cookie never authenticates the API
    assert s.client.get("/v1/epoch").status_code == 401
    # 4. another site's form cannot sign a browser in
    forged = s.client.post("/ui/login", data={"token": tok}, headers={"Origin": "https://evil.example"})
    assert forged.status_code == 403
    # 5. a revoked token's cookie leads back to the form, and logging out clears it
    s.access.revoke_token(s.access.tokens("bob")[0].token_id)
    r = s.client.get("/ui")
    assert r.status_code == 401 and "no longer valid" in r.text
    s.client.post("/ui/login", data={"token": s.token("bob")}, follow_redirects=False)
    assert s.client.get("/ui").status_code == 200
    out = s.client.post("/ui/logout", follow_redirects=False)
    assert out.status_code == 303 and out.headers["location"] == "/ui/login"
    assert s.client.get("/ui").status_code == 401


def test_the_anonymous_principal_sees_its_own_sources_without_a_token(serve: Callable[..., Served]) -> None:
    s = serve(ServeConfig(anonymous_principal="public"))
    s.access.grant("public", [Grant.parse("source:gamma")])
    r = s.client.get("/ui")
    assert r.status_code == 200 and "public (anonymous)" in r.text
    assert set(swatches(r.text)) == {"gamma"}


def test_serve_ui_with_the_registry_down_explains_with_503(tmp_path: Path) -> None:
    dead = dead_redis()
    keys = Keys("ui-dead")
    loader = CompositionLoader.from_config(
        ArtifactsConfig(url=tmp_path.as_uri()), base_dir=tmp_path / "reader", vectorize="loop"
    )
    live = LiveComposition(RegistryClient(dead, keys), loader, sample=FAST)
    app = create_app(
        ServeConfig(),
        live=live,
        auth=Authenticator(AccessRegistry(dead, keys)),
        registry_reader=RegistryClient(dead, keys),
        metrics_registry=CollectorRegistry(),
    )
    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.get("/ui", headers=auth(new_token()))  # well-formed: it must be looked up
        assert r.status_code == 503 and r.headers["retry-after"] == "5"
        assert "registry (Redis) is unreachable" in r.text and "cannot check your token" in r.text


def test_serve_ui_when_the_registry_fails_after_sign_in_is_a_page_with_a_banner(
    serve: Callable[..., Served], grids: GridCache, redis_client: redis.Redis, redis_namespace: str
) -> None:
    s = serve()
    tok = s.token("bob", "all")
    live = s.live
    app = create_app(  # tokens are checked on the real registry, the page's reads go to a dead one
        ServeConfig(),
        live=live,
        auth=Authenticator(AccessRegistry(redis_client, Keys(redis_namespace))),
        registry_reader=RegistryClient(dead_redis(), Keys(redis_namespace)),
        metrics_registry=CollectorRegistry(),
        grids=grids,
    )
    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.get("/ui", headers=auth(tok))
    assert r.status_code == 200
    assert 'class="banner error"' in r.text and "registry (Redis) is unreachable" in r.text
    assert r.text.count("unavailable: the registry cannot be read") == 4  # sources, progress, history, receipts
    assert f'id="served-epoch">{live.current().epoch}<' in r.text  # what the process knows is still there
    assert "cannot be read while the registry is unreachable" in r.text  # no grid without knowing the access


# ------------------------------------------------------------------------------------------ the daemon


def daemon_page(
    s: Served, reader: RegistryClient, grids: GridCache | None, coordinator: Coordinator | None, metrics: Metrics
) -> TestClient:
    def local() -> LocalStatus:
        return LocalStatus(
            ready=True,
            progress=(Progress("d-0", "train", "delta", step=30, steps=120, loss=0.0421, eta_s=95.0),),
            queued_jobs=1,
            dlq={
                sample.labels["reason"]: sample.value
                for metric in metrics.dlq_messages.collect()
                for sample in metric.samples
                if sample.name.endswith("_total")
            },
            facts={"daemon": "d-0"},
        )

    page = StatusPage(
        title="cdm daemon",
        reader=reader,
        live=s.live,
        grids=grids,
        coordinator=coordinator,
        local=local,
        own_daemon_id="d-0",
    )
    reg = CollectorRegistry()
    app = create_health_app(reg, lambda: True, lambda: (True, "ok"), ui=page)
    return TestClient(app, raise_server_exceptions=False)


def test_daemon_ui_shows_every_source_progress_dlq_history_and_receipts(
    serve: Callable[..., Served], grids: GridCache, redis_client: redis.Redis, redis_namespace: str
) -> None:
    s = serve()
    keys = Keys(redis_namespace)
    coordinator = Coordinator(redis_client, keys)
    coordinator.heartbeat("d-1", 30, {"host": "h1", "version": "0.1.0", "job": "train", "source": "epsilon",
                                      "step": 5, "steps": 50, "loss": 0.5, "eta_s": 12.0})  # fmt: skip
    coordinator.heartbeat("d-0", 30, {"host": "h0", "version": "0.1.0", "job": "train", "source": "delta", "step": 1})
    metrics = Metrics(CollectorRegistry(), dlq_reasons=("bad-header", "oversized"))
    metrics.dlq_messages.labels(reason="bad-header").inc(3)
    client = daemon_page(s, RegistryClient(redis_client, keys), grids, coordinator, metrics)
    assert "drawing the grid" in client.get("/ui").text
    wait_for_grid(s, grids, SOURCES)
    before = client.get("/ui").text
    assert set(swatches(before)) == {*SOURCES, "delta", "epsilon"}  # sources, and the sources being trained
    assert before.count('id="grid-img"') == 1
    # progress: this daemon's own job (not its heartbeat again) and the other daemon's from its heartbeat
    assert "30 / 120" in before and "1 min 35 s" in before and "0.0421" in before
    progress = section(before, "progress")
    assert "5 / 50" in progress and "12 s" in progress and progress.count("<tr>") == 3  # header + 2 jobs
    assert ">h1<" in section(before, "daemons") and ">h0<" in section(before, "daemons")
    # DLQ by reason, with the count
    assert re.search(r'<td class="mono">bad-header</td><td class="num">3</td>', before)
    # epoch history from the change stream
    assert f'<td class="num">{s.registry.epoch()}</td>' in before and ">activated<" in before
    # forget beta: a receipt, a new epoch, and alpha and gamma keep their colours
    receipt = forget_with_receipt(s.registry, "beta", "the owner asked")
    s.live.refresh()
    wait_for_grid(s, grids, ("alpha", "gamma"))
    after = client.get("/ui").text
    assert receipt.request_id[:12] in after and "the owner asked" in after
    assert 'class="state forgotten">forgotten<' in after
    assert {n: c for n, c in swatches(after).items() if n in ("alpha", "gamma")} == {
        n: c for n, c in swatches(before).items() if n in ("alpha", "gamma")
    }
    colours = grid_colours(after)
    assert source_colour("alpha") in colours and source_colour("gamma") in colours
    assert f'id="served-epoch">{s.registry.epoch()}<' in after


def test_daemon_ui_with_the_registry_down_is_200_with_a_banner_and_what_the_daemon_knows(
    serve: Callable[..., Served],
) -> None:
    s = serve()
    dead = dead_redis()
    metrics = Metrics(CollectorRegistry())
    metrics.dlq_messages.labels(reason="hash-mismatch").inc()
    client = daemon_page(s, RegistryClient(dead, Keys("x")), None, Coordinator(dead, Keys("x")), metrics)
    started = time.monotonic()
    r = client.get("/ui")
    assert time.monotonic() - started < 10  # one failed round trip, not one per section
    assert r.status_code == 200
    assert "registry (Redis) is unreachable" in r.text
    assert "30 / 120" in r.text and "hash-mismatch" in r.text  # its own job and dead letters
    assert r.text.count("unavailable: the registry cannot be read") == 4  # sources, history, receipts, daemons
    assert "sample grids are off" in r.text


def test_ui_is_404_without_a_page_and_refresh_is_bounded() -> None:
    app = create_health_app(CollectorRegistry(), lambda: True, lambda: (True, "ok"))
    with TestClient(app) as client:
        r = client.get("/ui")
    assert r.status_code == 404 and "/ui" in r.json()["error"]
    assert [refresh_of(v) for v in (None, "", "abc", "0", "1", "30", "99999", "-5")] == [10, 10, 10, 0, 2, 30, 3600, 10]


def test_grid_cache_never_blocks_and_retries_a_failed_drawing(serve: Callable[..., Served]) -> None:
    s = serve()
    comp = s.live.current()
    assert comp is not None
    calls: list[tuple[int, tuple[str, ...]]] = []
    now = [0.0]

    def draw(c: object, sources: tuple[str, ...]) -> tuple[bytes, np.ndarray]:
        calls.append((comp.epoch, sources))
        if len(calls) == 1:
            raise RuntimeError("compartment exploded")
        time.sleep(0.2)
        return b"png", np.full((2, len(sources)), 1.0 / len(sources))

    cache = GridCache(SPEC, draw=draw, retry_s=30, clock=lambda: now[0])
    try:
        t = time.monotonic()
        assert cache.get(comp, ("alpha",)).state == "drawing"
        assert time.monotonic() - t < 0.1
        failed = cache.wait(comp, ("alpha",), timeout=10)
        assert failed.state == "failed" and "compartment exploded" in failed.error
        assert cache.get(comp, ("alpha",)).state == "failed"  # not retried before retry_s
        now[0] += 31
        assert cache.get(comp, ("alpha",)).state == "drawing"
        done = cache.wait(comp, ("alpha",), timeout=10)
        assert done.state == "ready" and done.png == b"png" and done.attribution == (1.0,)
        assert cache.get(comp, ("alpha",)) is done and len(calls) == 2  # cached: drawn once per key
    finally:
        cache.close()
