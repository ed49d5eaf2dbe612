"""Property-based fuzzing of the HTTP API from its own OpenAPI schema, with schemathesis.

The schema is the live ``/openapi.json`` of a tiny.en server on loopback. For every operation,
schemathesis sends its coverage cases (boundaries, missing, wrong-typed and unexpected values,
deterministic) and then random requests, both valid (positive) and invalid (negative) by the
schema. Bounded: ``MAX_EXAMPLES`` random requests per operation and mode (``UPLOAD_EXAMPLES``
for the audio routes), about 1,500 requests in 30 s on two CPU cores.

What must hold for every request: no 5xx, an ``x-request-id``, OpenAI's error envelope on every
4xx, the declared content type, and JSON bodies that match the declared response models.

Schemathesis' own pytest integration (``schema.parametrize()``) does not run under pytest 9.2
(it writes ``Function._nodeid``, which pytest removed), so the operations are parametrized
here and each is driven with the documented ``APIOperation.as_strategy`` under ``@given``.
"""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
)

from server.app import create_app
from server.config import Settings
from tests.conftest import LiveServer

MAX_EXAMPLES = 50
# The audio routes are where the parsing is: they get more.
UPLOAD_EXAMPLES = 150
# Labels ("POST /v1/audio/transcriptions", ...) are read from the app offline so that pytest can
# list them; the cases themselves come from the live server's /openapi.json.
OPERATIONS = [
    result.ok().label
    for result in schemathesis.openapi.from_dict(
        create_app(Settings(model="unused")).openapi()
    ).get_all_operations()
]
UPLOADS = [label for label in OPERATIONS if label.startswith("POST /v1/audio/")]


def error_envelope(ctx: Any, response: schemathesis.Response, case: schemathesis.Case) -> bool:
    """Every answer has an x-request-id; every 4xx/5xx is OpenAI's error envelope."""
    assert response.headers.get("x-request-id"), "no x-request-id header"
    if response.status_code >= 400:
        body = response.json()
        assert isinstance(body, dict) and set(body) == {"error"}, body
        assert set(body["error"]) == {"message", "type", "param", "code"}, body
        assert body["error"]["message"], body
    return True


CHECKS = [
    not_a_server_error,
    error_envelope,
    content_type_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def api_schema(tiny_server: LiveServer) -> Any:
    loaded = schemathesis.openapi.from_url(tiny_server.url + "/openapi.json", timeout=30)
    loaded.config.update(base_url=tiny_server.url)
    return loaded


def _validate(case: schemathesis.Case, checks: list[Any]) -> None:
    case.call_and_validate(checks=checks, timeout=60)


@pytest.mark.parametrize("label", OPERATIONS)
def test_coverage_cases(api_schema: Any, label: str) -> None:
    """Schemathesis' deterministic boundary cases for the operation, valid and invalid."""
    operation = api_schema.find_operation_by_label(label)
    cases = list(
        api_schema.iter_coverage_cases(
            operation,
            generation_modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
            generation_config=api_schema.config.generation,
        )
    )
    assert cases
    for case in cases:
        _validate(case, CHECKS)


def _served_model(case: schemathesis.Case) -> schemathesis.Case:
    """Name the served model, so that a random upload gets past the model lookup to decoding."""
    case.body = {**case.body, "model": "whisper-1"}
    return case


# Negative cases need an input to break: only the audio routes take one that can be invalid
# (a GET without parameters has none, and any string is a valid path segment).
RANDOM_RUNS = [
    *((label, "positive") for label in OPERATIONS),
    *((label, mode) for label in UPLOADS for mode in ("positive_served_model", "negative")),
]


@pytest.mark.parametrize(("label", "mode"), RANDOM_RUNS)
def test_random_requests(api_schema: Any, label: str, mode: str) -> None:
    """Random requests drawn from the schema (positive) or just outside it (negative)."""
    operation = api_schema.find_operation_by_label(label)
    checks = CHECKS
    if mode == "negative":
        strategy = operation.as_strategy(generation_mode=GenerationMode.NEGATIVE)
        checks = [*CHECKS, negative_data_rejection]
    elif mode == "positive_served_model":
        strategy = operation.as_strategy(generation_mode=GenerationMode.POSITIVE).map(_served_model)
    else:
        strategy = operation.as_strategy(generation_mode=GenerationMode.POSITIVE)

    @given(case=strategy)
    @settings(
        max_examples=UPLOAD_EXAMPLES if label in UPLOADS else MAX_EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,  # the same requests on every run: a failure here is reproducible
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    def run(case: schemathesis.Case) -> None:
        _validate(case, checks)

    run()
