"""The status pages in a REAL browser: Debian's headless Chromium driven by playwright (never a browser playwright
downloads), loading ``/ui`` from a daemon-like health app and from ``cdm serve``, both on real uvicorn servers over
tiny compartments registered in the REAL test Redis.

Checked: the content (sources, states, epoch, progress, dead letters, receipts), the grid image loaded
(``naturalWidth > 0``), every swatch in its source's colour and unchanged when another source is forgotten, no
console error, no request leaving the page's origin; a browser user signs in on serve with a token and sees only
their sources. Screenshots go to the test's ``tmp_path`` and are copied to ``test-artifacts/ui/`` (gitignored) for
a human to look at.

Skipped only when Chromium is missing (deploy/local/bootstrap.sh installs it, so CI has it). ``CDM_CHROMIUM``
names another binary.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client import CollectorRegistry

from api.health import create_health_app
from api.server import AppServer
from api.ui import GridCache, GridSpec, LocalStatus, Progress, StatusPage
from cdm.viz import source_colour
from daemon.metrics import Metrics
from registry.coordination import Coordinator
from registry.keys import Keys
from registry.reader import RegistryClient
from tests.api.conftest import SOURCES, Served, forget_with_receipt

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts" / "ui"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
GRID_TIMEOUT_MS = 120_000  # the first grid is drawn in the background: the page's auto-refresh brings it

pytestmark = pytest.mark.slow


def chromium() -> str:
    path = os.environ.get("CDM_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip(
            "Chromium is not installed: deploy/local/bootstrap.sh installs Debian's `chromium` (make dev); "
            "or set CDM_CHROMIUM to a Chromium binary"
        )
    return path


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """A headless Chromium with a fresh profile (persistent context = its own --user-data-dir)."""
    path = chromium()
    from playwright.sync_api import sync_playwright  # a dev extra (make dev)

    profile = tempfile.mkdtemp(prefix="cdm-ui-chromium-")
    try:
        with sync_playwright() as pw:
            context = pw.chromium.launch_persistent_context(
                profile,
                executable_path=path,
                headless=True,
                args=CHROMIUM_ARGS,
                viewport={"width": 1400, "height": 900},
            )
            try:
                yield context
            finally:
                context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


@dataclass
class Watched:
    """A page and what it logged: console errors, uncaught exceptions, requests."""

    page: Any
    errors: list[str]
    requests: list[str]

    def screenshot(self, tmp_path: Path, name: str) -> Path:
        path = tmp_path / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, ARTIFACTS / path.name)
        return path

    def swatch_colours(self) -> dict[str, tuple[int, int, int]]:
        """source -> the computed background colour of its swatch in the sources table."""
        pairs = self.page.eval_on_selector_all(
            "#sources tr[data-source] .swatch",
            "els => els.map(e => [e.closest('tr').dataset.source, getComputedStyle(e).backgroundColor])",
        )
        out: dict[str, tuple[int, int, int]] = {}
        for name, css in pairs:
            r, g, b = (int(v) for v in css.removeprefix("rgb(").removesuffix(")").split(","))
            assert out.setdefault(name, (r, g, b)) == (r, g, b), f"{name} has two colours on one page"
        return out

    def grid_width(self) -> int:
        return int(self.page.eval_on_selector("#grid-img", "img => img.complete ? img.naturalWidth : 0"))


@pytest.fixture
def watched(browser: Any) -> Iterator[Watched]:
    page = browser.new_page()
    w = Watched(page, [], [])
    page.on("console", lambda msg: w.errors.append(f"console {msg.type}: {msg.text}") if msg.type == "error" else None)
    page.on("pageerror", lambda exc: w.errors.append(f"uncaught: {exc}"))
    page.on("request", lambda req: w.requests.append(req.url))
    try:
        yield w
    finally:
        page.close()


def load_with_grid(w: Watched, url: str, epoch: int) -> None:
    """Open ``url`` refreshing every second until the grid of ``epoch`` is there, then without auto-refresh."""
    w.page.goto(f"{url}?refresh=1")
    w.page.locator(f'#grid-img[alt*="epoch {epoch} "]').wait_for(timeout=GRID_TIMEOUT_MS)
    w.page.goto(f"{url}?refresh=0")


def only_same_origin(w: Watched, origin: str) -> None:
    foreign = [u for u in w.requests if not (u.startswith(origin) or u.startswith("data:"))]
    assert foreign == [], f"the page loaded assets from elsewhere: {foreign}"


# ------------------------------------------------------------------------------------------ the daemon


def test_daemon_ui_in_chromium(
    serve: Callable[..., Served], redis_client: redis.Redis, redis_namespace: str, watched: Watched, tmp_path: Path
) -> None:
    s = serve()
    keys = Keys(redis_namespace)
    s.registry.begin_training("delta", "fp-delta", {"test": True})  # a source in training
    Coordinator(redis_client, keys).heartbeat(
        "cdm-daemon-1",
        30,
        {"host": "node-b", "version": "0.1.0", "job": "retrain-router", "source": "", "step": 12, "steps": 40,
         "loss": 0.81, "eta_s": 20.0},
    )  # fmt: skip
    metrics = Metrics(CollectorRegistry(), dlq_reasons=("bad-header", "hash-mismatch", "oversized"))
    metrics.dlq_messages.labels(reason="hash-mismatch").inc(2)
    metrics.dlq_messages.labels(reason="oversized").inc()

    def local() -> LocalStatus:
        return LocalStatus(
            ready=True,
            progress=(Progress("cdm-daemon-0", "train", "delta", step=45, steps=120, loss=0.0734, eta_s=81.0),),
            queued_jobs=0,
            dlq={
                sample.labels["reason"]: sample.value
                for metric in metrics.dlq_messages.collect()
                for sample in metric.samples
                if sample.name.endswith("_total")
            },
            facts={"daemon": "cdm-daemon-0", "version": "0.1.0"},
        )

    grids = GridCache(GridSpec(n=8, steps=2))
    page = StatusPage(
        title="cdm daemon",
        reader=RegistryClient(redis_client, keys),
        live=s.live,
        grids=grids,
        coordinator=Coordinator(redis_client, keys),
        local=local,
        own_daemon_id="cdm-daemon-0",
    )
    app = create_health_app(CollectorRegistry(), lambda: True, lambda: (True, "ok"), ui=page)
    server = AppServer(app, "127.0.0.1", 0)
    server.start()
    try:
        w = watched
        epoch = s.registry.epoch()
        load_with_grid(w, f"{server.url}/ui", epoch)
        p = w.page
        # 1. content
        assert p.inner_text("#served-epoch") == str(epoch) == p.inner_text("#registry-epoch")
        assert p.inner_text("#ready") == "ready"
        rows = p.eval_on_selector_all("#sources tr[data-source]", "els => els.map(e => e.dataset.source)")
        assert set(rows) == {*SOURCES, "delta"}
        table = p.inner_text("#sources")
        assert "alpha@v1" in table and "delta@v1" in table and "training" in table and "active" in table
        progress = p.inner_text("#progress")
        assert "45 / 120" in progress and "1 min 21 s" in progress and "12 / 40" in progress
        dlq = p.inner_text("#dlq")
        assert "hash-mismatch" in dlq and "oversized" in dlq and "bad-header" not in dlq  # zero rows hidden once any
        assert "activated" in p.inner_text("#history") and "node-b" in p.inner_text("#daemons")
        # 2. the grid image loaded, and every swatch has its source's colour
        assert w.grid_width() > 0
        before = w.swatch_colours()
        assert before == {name: source_colour(name) for name in (*SOURCES, "delta")}
        legend = p.eval_on_selector_all("#grid .legend .src", "els => els.map(e => e.innerText.trim())")
        assert legend == list(SOURCES)
        w.screenshot(tmp_path, "daemon-ui")
        # 3. forget beta: a receipt, a new epoch, a new grid, and every other source keeps its colour
        receipt = forget_with_receipt(s.registry, "beta", "the data owner asked")
        s.live.refresh()
        load_with_grid(w, f"{server.url}/ui", receipt.epoch)
        assert p.inner_text("#served-epoch") == str(receipt.epoch)
        receipts = p.inner_text("#receipts")
        assert "beta" in receipts and "beta@v1" in receipts and "the data owner asked" in receipts
        after = w.swatch_colours()
        assert {k: v for k, v in after.items() if k != "beta"} == {k: v for k, v in before.items() if k != "beta"}
        legend = p.eval_on_selector_all("#grid .legend .src", "els => els.map(e => e.innerText.trim())")
        assert legend == ["alpha", "gamma"] and w.grid_width() > 0
        w.screenshot(tmp_path, "daemon-ui-after-forget")
        # 4. nothing went wrong in the browser, nothing was fetched from elsewhere
        assert w.errors == []
        only_same_origin(w, server.url)
    finally:
        server.stop()
        grids.close()


# ------------------------------------------------------------------------------------------ cdm serve


def test_serve_ui_in_chromium_signs_in_and_shows_only_the_callers_sources(
    serve: Callable[..., Served], watched: Watched, tmp_path: Path
) -> None:
    grids = GridCache(GridSpec(n=8, steps=2))
    s = serve(grids=grids)
    tok = s.token("bob", "source:alpha", "tag:license=cc-by")  # alpha and beta, not gamma
    server = AppServer(s.app, "127.0.0.1", 0)
    server.start()
    try:
        w = watched
        p = w.page
        # 1. a browser without a token gets the sign-in form (401), signs in with its token
        response = p.goto(f"{server.url}/ui")
        assert response is not None and response.status == 401
        w.screenshot(tmp_path, "serve-ui-sign-in")
        # Chromium reports the document's own 401 as a console error: that one is meant, and the only one
        assert [e for e in w.errors if "status of 401" not in e] == []
        w.errors.clear()
        p.fill("#token", tok)
        with p.expect_navigation():
            p.click("button[type=submit]")
        assert p.url == f"{server.url}/ui" and p.inner_text("#principal") == "bob"
        # 2. the page: bob's sources only, the grid of them
        epoch = s.registry.epoch()
        load_with_grid(w, f"{server.url}/ui", epoch)
        rows = p.eval_on_selector_all("#sources tr[data-source]", "els => els.map(e => e.dataset.source)")
        assert set(rows) == {"alpha", "beta"}
        assert "gamma" not in p.inner_text("body")
        assert p.inner_text("#served-epoch") == str(epoch)
        assert w.grid_width() > 0
        assert w.swatch_colours() == {"alpha": source_colour("alpha"), "beta": source_colour("beta")}
        assert p.locator("#dlq").count() == 0 and p.locator("#daemons").count() == 0  # the daemon's business
        w.screenshot(tmp_path, "serve-ui")
        # 3. logging out leads back to the form
        with p.expect_navigation():
            p.click("header button[type=submit]")
        assert p.url == f"{server.url}/ui/login" and p.locator("#token").count() == 1
        assert w.errors == []
        only_same_origin(w, server.url)
    finally:
        server.stop()
        grids.close()
