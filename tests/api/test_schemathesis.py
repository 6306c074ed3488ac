"""Schemathesis against the live app (real Redis, tiny compositions): generated requests, valid and invalid, for
every operation of /openapi.json. No response is a server error, and every response matches the schema: its
status is documented, its content type and body conform. Bounded: a fixed number of examples per operation and
mode (about a minute on 2 CPU cores).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from api.config import ServeConfig
from tests.api.conftest import Served

EXAMPLES = {GenerationMode.POSITIVE: 40, GenerationMode.NEGATIVE: 25}
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]


@pytest.mark.slow
def test_the_live_app_never_fails_and_never_breaks_its_schema(serve: Callable[..., Served]) -> None:
    # small limits keep generated requests cheap: n > 2 or steps > 2 is answered 429 without sampling
    s = serve(ServeConfig(max_n=2, max_steps=2, max_concurrent=4, max_attribute_draws=2, attribute_draws=1))
    token = s.token("fuzzer", "source:alpha", "tag:license=cc-by")
    schema = schemathesis.openapi.from_asgi("/openapi.json", s.app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/samples", "/v1/sources", "/v1/epoch", "/v1/attribute"}
    seen: dict[str, set[int]] = {}
    for op in operations:
        for mode, examples in EXAMPLES.items():
            if mode is GenerationMode.NEGATIVE and not len(op.body):
                continue  # no body to break (the only header, Authorization, is sent by the test)
            checks = [*CHECKS, negative_data_rejection] if mode is GenerationMode.NEGATIVE else CHECKS
            fuzz(op, mode, examples, checks, token, seen.setdefault(op.label, set()))
    # the run reached the handlers, not only the validators
    assert 200 in seen["POST /v1/samples"] and 422 in seen["POST /v1/samples"], seen
    assert 200 in seen["POST /v1/attribute"] and 200 in seen["GET /v1/sources"], seen


def fuzz(
    op: schemathesis.APIOperation, mode: GenerationMode, examples: int, checks: list, token: str, statuses: set[int]
) -> None:
    """``examples`` generated cases of ``op`` in ``mode``, each sent with the token and validated."""

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=op.as_strategy(generation_mode=mode))
    def run(case: schemathesis.Case) -> None:
        response = case.call_and_validate(headers={"Authorization": f"Bearer {token}"}, checks=checks)
        statuses.add(response.status_code)

    run()
