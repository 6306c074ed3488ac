"""``cdm serve`` through httpx's ASGI transport (Starlette's TestClient) over a real Redis registry.

Access rights: a request is composed only from the caller's sources, the others are never evaluated and never
appear in attribution, and a forbidden source answers exactly like a non-existent one.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import threading
import time
from collections.abc import Callable

import anyio.to_thread
import httpx
import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client import CollectorRegistry

from api.config import ServeConfig
from cdm.image_attribution import ImageAttribution
from registry.acl import Grant
from sampler.engine import AttributeRequest, SampleRequest, SampleResult, attribute_now, sample_now
from tests.api.conftest import SOURCES, Served, auth, decode_images, digit_sources, register


def sample(s: Served, token: str | None, **body: object) -> httpx.Response:
    headers = auth(token) if token else {}
    return s.client.post("/v1/samples", json=body, headers=headers)


def png_of(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------ sampling


def test_samples_in_every_format_carry_the_epoch_and_attribution_over_the_sources_used(
    serve: Callable[..., Served],
) -> None:
    s = serve()
    tok = s.token("alice", "all")
    epoch = s.registry.epoch()
    r = sample(s, tok, n=3, seed=7, labels=[1, 2])
    assert r.status_code == 200, r.text
    doc = r.json()
    assert r.headers["X-CDM-Epoch"] == str(epoch) and doc["epoch"] == epoch
    assert doc["sources"] == list(SOURCES) and r.headers["X-CDM-Sources"] == ",".join(SOURCES)
    att = np.array(doc["attribution"])
    assert att.shape == (3, 3) and np.allclose(att.sum(1), 1.0, atol=1e-5)
    images = decode_images(doc)
    assert images.shape == (3, 8, 8, 1) and images.dtype == np.uint8 and doc["image_shape"] == [8, 8, 1]
    assert doc["seed"] == 7 and doc["steps"] == 2 and doc["scheduler"] == "ddim"
    # the same seed gives the same images in every format
    z = np.load(io.BytesIO(sample(s, tok, n=3, seed=7, labels=[1, 2], format="npz").content))
    assert np.array_equal(z["images"], images) and list(z["sources"]) == list(SOURCES) and int(z["epoch"]) == epoch
    assert np.allclose(z["attribution"], att, atol=1e-6)
    grid = sample(s, tok, n=3, seed=7, labels=[1, 2], format="png")
    assert grid.headers["content-type"] == "image/png" and grid.headers["X-CDM-Epoch"] == str(epoch)
    assert np.allclose(json.loads(grid.headers["X-CDM-Attribution"]), att, atol=1e-4)
    with Image.open(io.BytesIO(grid.content)) as im:
        assert im.format == "PNG" and im.size[0] > 8 * 4
    # no seed: a random one, reported so the request can be replayed
    first, second = sample(s, tok, n=1).json(), sample(s, tok, n=1).json()
    assert first["seed"] != second["seed"]


def test_only_the_callers_sources_are_evaluated_and_they_are_the_only_columns(serve: Callable[..., Served]) -> None:
    s = serve()
    tok = s.token("bob", "source:alpha", "tag:license=cc-by")  # alpha by name, beta by its tag; not gamma
    r = sample(s, tok, n=2, seed=1)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["sources"] == ["alpha", "beta"] and np.array(doc["attribution"]).shape == (2, 2)
    assert s.calls["gamma"] == 0 and s.calls["alpha"] == 2 and s.calls["beta"] == 2  # 2 steps, one call each
    # `sources` narrows further: one column, one compartment evaluated
    s.calls.clear()
    r = sample(s, tok, n=2, seed=1, sources=["beta"])
    assert r.json()["sources"] == ["beta"] and np.allclose(r.json()["attribution"], 1.0)
    assert dict(s.calls) == {"beta": 2}
    # top-k keeps the columns of the sources used
    r = sample(s, tok, n=2, seed=1, top_k=1)
    assert r.json()["sources"] == ["alpha", "beta"]
    # GET /v1/sources lists the same two, with tags and sizes
    listed = s.client.get("/v1/sources", headers=auth(tok)).json()
    assert [x["name"] for x in listed["sources"]] == ["alpha", "beta"]
    beta = listed["sources"][1]
    assert beta["tags"] == {"license": "cc-by"} and beta["compartment_id"] == "beta@v1" and beta["n_samples"] > 0


def test_a_tag_grant_picks_up_sources_tagged_later_without_a_restart(serve: Callable[..., Served]) -> None:
    s = serve()
    tok = s.token("acme-app", "tag:tenant=acme")
    assert sample(s, tok, n=1, seed=0).json()["sources"] == ["gamma"]
    s.access.set_tags("alpha", {"tenant": "acme"})
    assert sample(s, tok, n=1, seed=0).json()["sources"] == ["alpha", "gamma"]
    s.access.remove_tags("alpha", ["tenant"])
    s.access.revoke("acme-app", [*s.access.grants_of("acme-app")])
    r = sample(s, tok, n=1, seed=0)
    assert r.status_code == 403 and "cdm acl grant" in r.json()["message"]


def test_forbidden_sources_answer_exactly_like_missing_ones(serve: Callable[..., Served]) -> None:
    s = serve()
    tok = s.token("bob", "source:alpha", "source:beta")
    pairs = [
        # (forbidden but existing, non-existent): same status, same body, same headers but the request id
        ({"sources": ["gamma"]}, {"sources": ["no-such-source"]}),
        ({"sources": ["gamma"], "n": 2}, {"sources": ["zzz"], "n": 2}),
        ({"sources": ["alpha", "gamma"], "seed": 3, "n": 2}, {"sources": ["alpha", "nope"], "seed": 3, "n": 2}),
        (
            {"sources": ["gamma", "beta"], "seed": 3, "format": "npz"},
            {"sources": ["beta", "x"], "seed": 3, "format": "npz"},
        ),
    ]
    for forbidden, missing in pairs:
        a, b = sample(s, tok, **forbidden), sample(s, tok, **missing)
        assert a.status_code == b.status_code, (forbidden, a.text, b.text)
        assert a.content == b.content, (forbidden, a.text[:200], b.text[:200])
        ha = {k: v for k, v in a.headers.items() if k != "x-request-id"}
        hb = {k: v for k, v in b.headers.items() if k != "x-request-id"}
        assert ha == hb
    assert sample(s, tok, sources=["gamma"]).status_code == 403
    # attribution of an image: the same again, and gamma never appears
    img = png_of(np.full((8, 8, 1), 128, np.uint8))
    body = {"image": base64.b64encode(img).decode(), "seed": 1, "draws": 2}
    a = s.client.post("/v1/attribute", json={**body, "sources": ["alpha", "gamma"]}, headers=auth(tok))
    b = s.client.post("/v1/attribute", json={**body, "sources": ["alpha", "ghost"]}, headers=auth(tok))
    assert a.status_code == b.status_code == 200 and a.content == b.content and a.json()["sources"] == ["alpha"]
    a = s.client.post("/v1/attribute", json={**body, "sources": ["gamma"]}, headers=auth(tok))
    b = s.client.post("/v1/attribute", json={**body, "sources": ["ghost"]}, headers=auth(tok))
    assert a.status_code == b.status_code == 403 and a.content == b.content
    # and the listing never mentions it
    listed = s.client.get("/v1/sources", headers=auth(tok))
    assert "gamma" not in listed.text and "acme" not in listed.text


def test_forbidden_and_missing_sources_take_the_same_time(serve: Callable[..., Served]) -> None:
    """Interleaved requests for a forbidden and for a non-existent source: their latencies are one distribution.

    Mann-Whitney U over 200 requests each (two-sided): a leak of even one extra Redis round trip (~0.1 ms on
    loopback) shifts every sample and is detected; identical code paths fail the test 1 time in 1000.
    """
    from scipy.stats import mannwhitneyu

    s = serve()
    tok = s.token("bob", "source:alpha")
    times: dict[str, list[float]] = {"forbidden": [], "missing": []}
    for _ in range(20):  # warm-up: connection pools, code paths
        sample(s, tok, sources=["gamma"])
        sample(s, tok, sources=["nonexistent"])
    for i in range(400):
        kind, name = ("forbidden", "gamma") if i % 2 == 0 else ("missing", "nonexistent")
        t0 = time.perf_counter()
        r = sample(s, tok, sources=[name])
        times[kind].append(time.perf_counter() - t0)
        assert r.status_code == 403
    p = mannwhitneyu(times["forbidden"], times["missing"], alternative="two-sided").pvalue
    med = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
    assert p > 1e-3, f"latencies differ (p = {p:.2g}, medians in ms {med})"


# ------------------------------------------------------------------------------------------ errors


def test_401_for_missing_malformed_unknown_and_revoked_tokens(serve: Callable[..., Served]) -> None:
    s = serve()
    tok = s.token("alice", "all")
    cases = {
        "missing": {},
        "not bearer": {"Authorization": f"Basic {tok}"},
        "empty bearer": {"Authorization": "Bearer "},
        "malformed": {"Authorization": "Bearer hello"},
        "unknown": {"Authorization": "Bearer cdm_" + "A" * 43},
    }
    for what, headers in cases.items():
        for method, path, kw in (
            ("POST", "/v1/samples", {"json": {"n": 1}}),
            ("GET", "/v1/sources", {}),
            ("GET", "/v1/epoch", {}),
            ("POST", "/v1/attribute", {"json": {"image": "AA=="}}),
        ):
            r = s.client.request(method, path, headers=headers, **kw)
            assert r.status_code == 401, (what, path, r.text)
            assert r.json()["error"] == "unauthorized" and r.headers["WWW-Authenticate"].startswith("Bearer")
    # a body that is invalid too: authentication comes first
    assert s.client.post("/v1/samples", json={"n": -1}).status_code == 401
    assert s.client.get("/v1/epoch", headers=auth(tok)).status_code == 200
    (record,) = s.access.tokens("alice")
    s.access.revoke_token(record.token_id)
    r = s.client.get("/v1/epoch", headers=auth(tok))
    assert r.status_code == 401 and "revoked" in r.json()["message"]


def test_anonymous_principal_is_off_by_default_and_gets_its_own_grants(serve: Callable[..., Served]) -> None:
    s = serve(ServeConfig(anonymous_principal="public", max_n=4, max_steps=4))
    s.access.grant("public", [Grant.parse("tag:license=cc-by")])
    r = sample(s, None, n=1, seed=0)
    assert r.status_code == 200 and r.json()["sources"] == ["beta"]
    assert s.client.post("/v1/samples", json={"n": 1}, headers={"Authorization": "Bearer nope"}).status_code == 401
    assert ServeConfig().anonymous_principal == ""


def test_403_when_nothing_is_allowed(serve: Callable[..., Served]) -> None:
    s = serve()
    tok = s.token("nobody")  # a token, no grant
    r = sample(s, tok, n=1)
    assert r.status_code == 403 and r.json() == {
        "error": "forbidden",
        "message": "no source is available to principal 'nobody'; an operator grants access with `cdm acl grant`",
    }
    assert s.client.get("/v1/sources", headers=auth(tok)).json()["sources"] == []
    assert sum(s.calls.values()) == 0


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"n": 0}, "n: Input should be greater than or equal to 1"),
        ({"n": "many"}, "n: Input should be a valid integer"),
        ({"n": 1, "scheduler": "euler"}, "scheduler: Input should be 'ddpm', 'ddim' or 'dpm'"),
        ({"n": 1, "format": "gif"}, "format: Input should be 'png', 'npz' or 'json'"),
        ({"n": 1, "colour": "red"}, "colour: Extra inputs are not permitted"),
        ({"n": 1, "sources": ["bad name!"]}, "sources.0: String should match pattern"),
        ({"n": 1, "sources": []}, "sources: List should have at least 1 item"),
        ({"n": 1, "labels": [10]}, "class label 10 is out of range; labels must be in [0, 10)"),
        ({"n": 1, "labels": [-1]}, "labels.0: Input should be greater than or equal to 0"),
        ({"n": 1, "seed": -5}, "seed: Input should be greater than or equal to 0"),
        ({"n": 1, "steps": 100000}, "steps: Input should be less than or equal to 1000"),
    ],
)
def test_422_names_the_bad_parameter(serve: Callable[..., Served], body: dict, needle: str) -> None:
    s = serve()
    r = sample(s, s.token("alice", "all"), **body)
    assert r.status_code == 422 and r.json()["error"] == "invalid_request"
    assert needle in r.json()["message"], r.json()["message"]


def test_422_for_a_body_that_is_not_json(serve: Callable[..., Served]) -> None:
    s = serve()
    r = s.client.post(
        "/v1/samples", content=b"{n: 1", headers={**auth(s.token("a", "all")), "content-type": "application/json"}
    )
    assert r.status_code == 422 and "JSON" in r.json()["message"]


def test_429_beyond_the_principals_limits(serve: Callable[..., Served]) -> None:
    s = serve(ServeConfig(max_n=4, max_steps=3, max_concurrent=2, max_attribute_draws=4, attribute_draws=2))
    tok = s.token("alice", "all")
    r = sample(s, tok, n=5)
    assert r.status_code == 429 and "n = 5 is more than the 4 images" in r.json()["message"]
    r = sample(s, tok, n=1, steps=4)
    assert r.status_code == 429 and "steps = 4 is more than the 3 denoising steps" in r.json()["message"]
    img = base64.b64encode(png_of(np.zeros((8, 8, 1), np.uint8))).decode()
    r = s.client.post("/v1/attribute", json={"image": img, "draws": 5}, headers=auth(tok))
    assert r.status_code == 429 and "draws = 5" in r.json()["message"]
    # two requests of alice already running (on other replicas): a third is refused until one ends
    assert s.ledger.acquire("alice", "elsewhere-1", limit=2, lease_ms=60_000)
    assert s.ledger.acquire("alice", "elsewhere-2", limit=2, lease_ms=60_000)
    r = sample(s, tok, n=1)
    assert r.status_code == 429 and r.headers["Retry-After"] == "1"
    assert "already has 2 request(s) running" in r.json()["message"]
    assert sample(s, s.token("carol", "all"), n=1).status_code == 200, "limits are per principal"
    s.ledger.release("alice", "elsewhere-1")
    assert sample(s, tok, n=1).status_code == 200
    assert s.ledger.in_flight("alice") == 1, "a finished request gives its slot back"
    # a replica that died holding a slot: the lease expires
    assert s.ledger.acquire("dora", "crashed", limit=1, lease_ms=50)
    time.sleep(0.1)
    assert s.ledger.acquire("dora", "next", limit=1, lease_ms=60_000)


def test_503_and_not_ready_until_a_composition_is_served(serve: Callable[..., Served]) -> None:
    s = serve(sources=())
    tok = s.token("alice", "all")
    r = sample(s, tok, n=1)
    assert r.status_code == 503 and "no composition is served yet" in r.json()["message"]
    ready = s.client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["status"] == "not ready"
    assert s.client.get("/healthz").json() == {"status": "ok"}


def test_readyz_follows_the_registry(serve: Callable[..., Served], trained: object) -> None:
    now = [1000.0]
    s = serve(ServeConfig(ready_max_lag_s=30), clock=lambda: now[0])
    r = s.client.get("/readyz")
    assert r.status_code == 200 and r.json()["epoch"] == r.json()["registry_epoch"] == s.registry.epoch()
    # the registry moves on; this replica has not swapped yet (no watcher in this test): ready while it may load
    s.access.set_tags("alpha", {"x": "y"})  # not a composition change: the epoch stays
    assert s.client.get("/readyz").status_code == 200
    s.registry.retire("alpha@v1", "test")
    assert s.client.get("/readyz").status_code == 200
    now[0] += 31
    r = s.client.get("/readyz")
    assert r.status_code == 503 and "but the registry is at" in r.json()["reason"]
    s.live.refresh()
    assert s.client.get("/readyz").status_code == 200
    # a failed hot swap: still serving, not ready
    router = s.registry.snapshot().router
    assert router is not None
    s.registry.set_router(dataclasses.replace(router, router_id="broken", sha256={"x": "0" * 64}))
    s.live.refresh()
    r = s.client.get("/readyz")
    assert r.status_code == 503 and "failed" in r.json()["reason"]
    assert sample(s, s.token("alice", "all"), n=1).status_code == 200, "the last good composition keeps serving"


# ------------------------------------------------------------------------------------------ the registry moves


def test_a_forgotten_source_is_never_used_again_even_before_the_hot_swap(serve: Callable[..., Served]) -> None:
    s = serve()
    tok = s.token("alice", "all")
    before = sample(s, tok, n=1, seed=0).json()
    assert "beta" in before["sources"]
    receipt = s.registry.forget_source("beta", "test")
    # no swap yet: the composition of the old epoch is still loaded, but beta is not active any more
    s.calls.clear()
    stale = sample(s, tok, n=1, seed=0).json()
    assert stale["epoch"] == before["epoch"] < receipt.epoch and "beta" not in stale["sources"]
    assert s.calls["beta"] == 0
    s.live.refresh()
    after = sample(s, tok, n=1, seed=0).json()
    assert after["epoch"] == receipt.epoch and after["sources"] == ["alpha", "gamma"]
    assert "beta" not in s.client.get("/v1/sources", headers=auth(tok)).text


def test_a_new_epoch_is_served_without_a_restart(serve: Callable[..., Served], trained: object) -> None:
    s = serve(sources=("alpha",))
    tok = s.token("alice", "all")
    first = sample(s, tok, n=1).json()
    assert first["sources"] == ["alpha"]
    register(s.registry, trained, ("beta",))  # type: ignore[arg-type]
    s.live.refresh()
    s.count_calls()
    second = sample(s, tok, n=1)
    assert second.json()["sources"] == ["alpha", "beta"] and int(second.headers["X-CDM-Epoch"]) > first["epoch"]
    assert s.client.get("/v1/epoch", headers=auth(tok)).json()["epoch"] == second.json()["epoch"]


# ------------------------------------------------------------------------------------------ attribute


def test_attribute_reports_the_posterior_over_the_callers_sources_without_running_compartments(
    serve: Callable[..., Served],
) -> None:
    s = serve()
    tok = s.token("bob", "source:alpha", "source:gamma")
    # an image of one of alpha's digits (digits 0-3 are alpha's)
    out = sample(s, s.token("admin", "all"), n=1, seed=5, sources=["alpha"], labels=[0]).json()
    png = base64.b64decode(out["images"][0])
    s.calls.clear()
    r = s.client.post(
        "/v1/attribute",
        json={"image": base64.b64encode(png).decode(), "timesteps": [10, 100], "draws": 3, "seed": 2},
        headers=auth(tok),
    )
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["sources"] == ["alpha", "gamma"] and doc["epoch"] == s.registry.epoch()
    assert abs(sum(doc["posterior"]) - 1) < 1e-5 and doc["top_source"] in doc["sources"]
    assert [b["t"] for b in doc["by_timestep"]] == [10, 100] and doc["draws"] == 3
    assert np.allclose(np.mean([b["posterior"] for b in doc["by_timestep"]], axis=0), doc["posterior"])
    assert doc["method"] == "router" and "mean over the draws" in doc["method_description"]
    assert sum(s.calls.values()) == 0, "attribution evaluates the router only"
    # the same as a multipart upload
    m = s.client.post(
        "/v1/attribute",
        files={"image": ("x.png", png, "image/png")},
        data={"timesteps": "10,100", "draws": "3", "seed": "2"},
        headers=auth(tok),
    )
    assert m.status_code == 200 and m.json() == doc


def test_attribute_with_the_density_kind_runs_only_the_callers_compartments(serve: Callable[..., Served]) -> None:
    s = serve()
    tok = s.token("bob", "source:alpha", "source:gamma")
    epoch = s.registry.set_routing("density")  # no router: the compartments' ELBOs
    comp = s.live.refresh()
    assert comp is not None and comp.routing == "density" and comp.epoch == epoch
    s.count_calls()
    png = png_of(digit_sources(3)[0].images[0])  # one of alpha's digits (0-3)
    body = {"image": base64.b64encode(png).decode(), "timesteps": [10, 100], "draws": 3, "seed": 2}
    s.calls.clear()
    s.rows.clear()
    r = s.client.post("/v1/attribute", json=body, headers=auth(tok))
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["sources"] == ["alpha", "gamma"] and doc["epoch"] == epoch and doc["method"] == "elbo"
    assert "ELBO" in doc["method_description"] and doc["draws"] == 3 and doc["seed"] == 2
    assert abs(sum(doc["posterior"]) - 1) < 1e-9 and doc["top_source"] in doc["sources"]
    assert [b["t"] for b in doc["by_timestep"]] == [10, 100]
    assert all(abs(sum(b["posterior"]) - 1) < 1e-9 for b in doc["by_timestep"])
    # the caller's compartments only: one call per timestep on the draws' rows; beta never runs
    assert s.calls == {"alpha": 2, "gamma": 2} and s.rows == {"alpha": 6, "gamma": 6}
    m = s.client.post(
        "/v1/attribute",
        files={"image": ("x.png", png, "image/png")},
        data={"timesteps": "10,100", "draws": "3", "seed": "2"},
        headers=auth(tok),
    )
    assert m.status_code == 200 and m.json() == doc
    # a label: P(source | class) from the class counts; class 0 is only alpha's, so gamma never runs
    s.calls.clear()
    lab = s.client.post("/v1/attribute", json={**body, "label": 0}, headers=auth(tok)).json()
    assert lab["posterior"] == [1.0, 0.0] and s.calls == {"alpha": 2}
    bad = s.client.post("/v1/attribute", json={**body, "label": 5}, headers=auth(tok))  # 4-6 are beta's digits
    assert bad.status_code == 422 and "has a positive prior for its class label 5" in bad.json()["message"], bad.text
    # forbidden and missing sources: the same answer as with the learnt kind
    a = s.client.post("/v1/attribute", json={**body, "sources": ["beta"]}, headers=auth(tok))
    b = s.client.post("/v1/attribute", json={**body, "sources": ["ghost"]}, headers=auth(tok))
    assert a.status_code == b.status_code == 403 and a.content == b.content and "beta" not in s.calls


@pytest.mark.parametrize(
    ("kwargs", "status", "needle"),
    [
        ({"json": {"image": "not base64!"}}, 422, "not valid base64"),
        ({"json": {"image": base64.b64encode(b"GIF89a....").decode()}}, 422, "not a readable PNG"),
        ({"json": {"image": "AA==", "draws": 0}}, 422, "draws: Input should be greater than or equal to 1"),
        ({"json": {"image": "AA==", "timesteps": [1000]}}, 422, "timesteps.0: Input should be less than or equal"),
        ({"files": {"picture": ("x.png", b"x", "image/png")}}, 422, "image: missing"),
        ({"content": b"raw", "headers": {"content-type": "image/png"}}, 415, "is not accepted"),
        ({"json": {"image": base64.b64encode(b"x" * 5000).decode()}}, 413, "at most 4096"),
    ],
)
def test_attribute_rejects_bad_uploads(serve: Callable[..., Served], kwargs: dict, status: int, needle: str) -> None:
    s = serve(ServeConfig(max_upload_bytes=4096))
    tok = s.token("alice", "all")
    headers = {**auth(tok), **kwargs.pop("headers", {})}
    r = s.client.post("/v1/attribute", headers=headers, **kwargs)
    assert r.status_code == status and needle in r.json()["message"], r.text


# ------------------------------------------------------------------------------------------ audit, metrics, schema


def test_every_api_request_is_audited(serve: Callable[..., Served]) -> None:
    s = serve()
    tok = s.token("bob", "source:alpha")
    sample(s, tok, n=2, seed=0)
    sample(s, tok, n=1, sources=["gamma"])
    sample(s, None, n=1)
    s.client.get("/healthz")  # not an API request
    ok, denied, anonymous = reversed(s.ledger.audit(10))
    assert ok["principal"] == "bob" and ok["status"] == "200" and ok["sources"] == "alpha" and ok["n"] == "2"
    assert ok["epoch"] == str(s.registry.epoch()) and ok["route"] == "/v1/samples" and ok["token_id"].startswith("tok_")
    assert denied["status"] == "403" and denied["sources"] == "" and denied["requested"] == "gamma"
    assert anonymous["status"] == "401" and anonymous["principal"] == ""
    assert len(s.ledger.audit(100)) == 3


def test_the_audit_stream_is_capped(redis_client: redis.Redis, redis_namespace: str) -> None:
    from registry.acl import ServeLedger
    from registry.keys import Keys

    ledger = ServeLedger(redis_client, Keys(redis_namespace), audit_maxlen=10)
    for i in range(600):
        ledger.append({"i": i})
    n = redis_client.xlen(Keys(redis_namespace).serve_audit)
    assert 10 <= n < 600  # XADD MAXLEN ~ trims whole stream nodes (100 entries each by default)
    assert ledger.audit(1)[0]["i"] == "599"


def test_metrics(serve: Callable[..., Served]) -> None:
    s = serve(ServeConfig(metrics_max_principals=2, max_n=8, max_steps=4))
    tokens = [s.token(p, "all") for p in ("p1", "p2", "p3")]
    for tok in tokens:
        assert sample(s, tok, n=2).status_code == 200
    sample(s, None, n=1)
    m = s.metrics
    assert (
        m.get_sample_value("cdm_serve_requests_total", {"route": "/v1/samples", "method": "POST", "status": "200"}) == 3
    )
    assert (
        m.get_sample_value("cdm_serve_requests_total", {"route": "/v1/samples", "method": "POST", "status": "401"}) == 1
    )
    assert (
        m.get_sample_value(
            "cdm_serve_request_seconds_count", {"route": "/v1/samples", "method": "POST", "status": "200"}
        )
        == 3
    )
    assert m.get_sample_value("cdm_serve_images_total") == 6
    assert m.get_sample_value("cdm_serve_in_flight") == 0
    assert m.get_sample_value("cdm_serve_epoch") == s.registry.epoch()
    principals = {
        p: m.get_sample_value("cdm_serve_principal_requests_total", {"principal": p, "status": "200"})
        for p in ("p1", "p2", "other")
    }
    assert principals == {"p1": 1, "p2": 1, "other": 1}, "two named principals, the third is 'other'"
    assert m.get_sample_value("cdm_serve_principal_requests_total", {"principal": "-", "status": "401"}) == 1
    text = s.client.get("/metrics").text
    for name in (
        "cdm_serve_requests_total",
        "cdm_serve_request_seconds_bucket",
        "cdm_serve_in_flight",
        "cdm_serve_epoch",
    ):
        assert name in text
    s.client.get("/nowhere")
    assert m.get_sample_value("cdm_serve_requests_total", {"route": "unmatched", "method": "GET", "status": "404"}) == 1


def test_openapi_documents_every_endpoint_and_bearer_auth(serve: Callable[..., Served]) -> None:
    s = serve()
    doc = s.client.get("/openapi.json").json()
    assert {"/v1/samples", "/v1/sources", "/v1/epoch", "/v1/attribute", "/healthz", "/readyz"} <= set(doc["paths"])
    assert doc["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    samples = doc["paths"]["/v1/samples"]["post"]
    assert {"200", "401", "403", "422", "429", "503"} <= set(samples["responses"])
    body = doc["paths"]["/v1/attribute"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= set(body)


class GatedSampler:
    """A ``Sampler`` (the seam a batcher will implement) that holds each request until released."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.requests: list[SampleRequest] = []

    async def sample(self, request: SampleRequest) -> SampleResult:
        self.requests.append(request)
        self.entered.set()
        await anyio.to_thread.run_sync(self.release.wait)
        return sample_now(request)

    async def attribute(self, request: AttributeRequest) -> ImageAttribution:
        return attribute_now(request)


def test_concurrent_requests_beyond_the_limit_get_429_and_the_sampler_is_replaceable(
    serve: Callable[..., Served],
) -> None:
    gate = GatedSampler()
    s = serve(ServeConfig(max_n=4, max_steps=4, max_concurrent=1), sampler=gate)
    tok = s.token("alice", "source:alpha", "source:gamma")
    first: list[int] = []
    t = threading.Thread(target=lambda: first.append(sample(s, tok, n=1, seed=0).status_code))
    t.start()
    try:
        assert gate.entered.wait(30), "the first request never reached the sampler"
        second = sample(s, tok, n=1)
        assert second.status_code == 429 and "already has 1 request(s) running" in second.json()["message"]
    finally:
        gate.release.set()
        t.join(30)
    assert first == [200]
    (req,) = gate.requests
    assert req.sources == ("alpha", "gamma") and req.composition.epoch == s.registry.epoch() and req.n == 1
    assert sample(s, tok, n=1).status_code == 200, "the slot was given back"


def test_readiness_and_the_registry_epoch_are_exported_while_the_app_runs(serve: Callable[..., Served]) -> None:
    s = serve(ServeConfig(max_n=8, max_steps=4, resync_s=0.1))
    m = s.metrics
    assert m.get_sample_value("cdm_ready") == 0  # the poll runs with the app's lifespan only
    with TestClient(s.app) as client:
        assert m.get_sample_value("cdm_ready") == 1
        assert m.get_sample_value("cdm_registry_latest_epoch") == s.registry.epoch()
        s.registry.forget_source("beta", "test")  # the registry moves on; this app has no watcher running
        deadline = time.monotonic() + 10
        while m.get_sample_value("cdm_registry_latest_epoch") != s.registry.epoch() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert m.get_sample_value("cdm_registry_latest_epoch") == s.registry.epoch()
        assert m.get_sample_value("cdm_serve_epoch") < s.registry.epoch()  # what the served-epoch alert compares
        text = client.get("/metrics").text
        assert "cdm_ready 1.0" in text and f"cdm_registry_latest_epoch {float(s.registry.epoch())}" in text


def test_readiness_poll_counts_a_failing_probe_as_not_ready() -> None:
    from api.metrics import ReadinessPoll, ServeMetrics

    reg = CollectorRegistry()
    metrics = ServeMetrics(reg, max_principals=1, served_epoch=lambda: None)
    answers: list[tuple[bool, int | None] | Exception] = [(True, 7), RuntimeError("redis down"), (False, None)]

    def probe() -> tuple[bool, int | None]:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    poll = ReadinessPoll(probe, metrics, interval_s=1.0)
    poll.poll()
    assert (reg.get_sample_value("cdm_ready"), reg.get_sample_value("cdm_registry_latest_epoch")) == (1, 7)
    poll.poll()
    assert (reg.get_sample_value("cdm_ready"), reg.get_sample_value("cdm_registry_latest_epoch")) == (0, 7)
    poll.poll()
    assert (reg.get_sample_value("cdm_ready"), reg.get_sample_value("cdm_registry_latest_epoch")) == (0, 7)
    with pytest.raises(ValueError, match="interval_s"):
        ReadinessPoll(probe, metrics, interval_s=0)
