"""``cdm serve`` with the cross-request batcher (``[serve] batching = true``, the default; every other test in this
directory runs with it too): concurrent callers with different rights share engine iterations and get the results
they would get alone, compartments never see rows of callers that may not use them, and overload is a 503.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from api.app import default_sampler
from api.config import ServeConfig
from cdm.errors import ConfigError
from sampler.batching import BatchingSampler
from sampler.engine import PerRequestSampler
from tests.api.conftest import Served, auth, decode_images


def test_batching_is_the_default_and_configurable() -> None:
    assert ServeConfig().batching is True
    assert isinstance(default_sampler(ServeConfig()), BatchingSampler)
    off = default_sampler(ServeConfig(batching=False, sampling_threads=3))
    assert isinstance(off, PerRequestSampler)
    on = default_sampler(ServeConfig(max_batch_rows=12, max_wait_ms=20, sample_timeout_s=30))
    assert isinstance(on, BatchingSampler)
    assert (on.max_batch_rows, on.max_wait_s, on.timeout_s) == (12, 0.02, 30)
    for bad, needle in (
        ({"max_batch_rows": 0}, "max_batch_rows"),
        ({"max_wait_ms": -1}, "max_wait_ms"),
        ({"sample_timeout_s": 0}, "sample_timeout_s"),
        ({"sample_timeout_s": 700, "request_lease_s": 600}, "must be <= serve.request_lease_s"),
        ({"batching": "yes"}, "batching"),
    ):
        with pytest.raises(ConfigError, match=needle):
            ServeConfig(**bad)


def test_concurrent_callers_share_iterations_and_get_their_own_results(serve: Callable[..., Served]) -> None:
    batched = serve(ServeConfig(max_n=4, max_steps=4, max_concurrent=8, max_wait_ms=300))
    # the reference: the same registry (sources=() registers nothing more), each request sampled on its own
    alone = serve(ServeConfig(max_n=4, max_steps=4, max_concurrent=8, batching=False), sources=())
    grants = {
        "all": ("all",),
        "ab": ("source:alpha", "source:beta"),
        "c": ("tag:tenant=acme",),
        "b": ("tag:license=cc-by",),
    }
    bodies: list[tuple[str, dict[str, Any]]] = [
        ("all", {"n": 2, "seed": 1, "labels": [3, 4]}),
        ("ab", {"n": 1, "seed": 2, "top_k": 1}),
        ("c", {"n": 3, "seed": 3, "steps": 3, "scheduler": "ddpm"}),
        ("b", {"n": 2, "seed": 4, "labels": [7], "guidance_scale": 2.5}),
        ("all", {"n": 1, "seed": 5, "sources": ["gamma", "alpha"], "scheduler": "dpm", "steps": 4}),
        ("ab", {"n": 2, "seed": 6, "labels": [1, 2], "guidance_scale": 3.0, "top_k": 1}),
    ]
    tokens = {p: batched.token(f"{p}-user", *g) for p, g in grants.items()}  # one access registry for both apps
    responses: dict[int, dict[str, Any]] = {}
    errors: list[str] = []
    barrier = threading.Barrier(len(bodies))

    def call(i: int) -> None:
        principal, body = bodies[i]
        barrier.wait()
        r = batched.client.post("/v1/samples", json=body, headers=auth(tokens[principal]))
        if r.status_code != 200:
            errors.append(r.text)
        else:
            responses[i] = r.json()

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(responses) == len(bodies)
    # 1. every caller got what it gets alone (same seed), over exactly its own sources
    for i, (principal, body) in enumerate(bodies):
        ref = alone.client.post("/v1/samples", json=body, headers=auth(tokens[principal])).json()
        got = responses[i]
        assert got["sources"] == ref["sources"] and got["guidance_scale"] == body.get("guidance_scale", 1.0)
        diff = np.abs(decode_images(got).astype(int) - decode_images(ref).astype(int))
        assert diff.max() <= 1, (body, diff.max())
        np.testing.assert_allclose(got["attribution"], ref["attribution"], rtol=1e-4, atol=1e-5)
    assert [responses[i]["sources"] for i in (2, 3)] == [["gamma"], ["beta"]]
    # 2. the rows of callers with different rights went through shared iterations
    m = batched.metrics
    iterations = m.get_sample_value("cdm_serve_batch_requests_count")
    requests = m.get_sample_value("cdm_serve_batch_requests_sum")
    assert iterations and requests and requests / iterations > 1.5, (iterations, requests)
    assert m.get_sample_value("cdm_serve_batch_rows_count") == iterations
    # 3. one call per compartment per iteration, and gamma saw exactly the rows of the three requests that may use
    # it (full mixture, default 2 steps): "all" 2 x 2, "c" 3 x 3, "all" with sources gamma+alpha 1 x 4; a row of
    # "ab" or "b" reaching gamma would show here
    assert all(batched.calls[name] <= iterations for name in ("alpha", "beta", "gamma")), batched.calls
    assert batched.rows["gamma"] == 2 * 2 + 3 * 3 + 1 * 4, batched.rows


def test_guidance_over_http(serve: Callable[..., Served]) -> None:
    s = serve()
    tok = s.token("alice", "all")
    plain = s.client.post("/v1/samples", json={"n": 2, "seed": 9, "labels": [2]}, headers=auth(tok)).json()
    guided = s.client.post(
        "/v1/samples", json={"n": 2, "seed": 9, "labels": [2], "guidance_scale": 4.0}, headers=auth(tok)
    ).json()
    assert plain["guidance_scale"] == 1.0 and guided["guidance_scale"] == 4.0
    assert not np.array_equal(decode_images(plain), decode_images(guided))
    s.calls.clear()
    s.client.post("/v1/samples", json={"n": 1, "seed": 9, "guidance_scale": 4.0}, headers=auth(tok))
    assert s.calls["alpha"] == 2, "without labels guidance is a no-op: one call per step, no null twin"
    r = s.client.post("/v1/samples", json={"n": 1, "guidance_scale": -1}, headers=auth(tok))
    assert r.status_code == 422 and "guidance_scale" in r.json()["message"]


def test_an_overloaded_batcher_answers_503(serve: Callable[..., Served]) -> None:
    s = serve(ServeConfig(max_n=4, max_steps=4, sample_timeout_s=0.001))
    r = s.client.post("/v1/samples", json={"n": 1, "seed": 0}, headers=auth(s.token("alice", "all")))
    assert r.status_code == 503 and r.json()["error"] == "unavailable", r.text
    assert "not finished within" in r.json()["message"] and r.headers["Retry-After"] == "5"
    assert s.ledger.in_flight("alice") == 0, "the slot was given back"
