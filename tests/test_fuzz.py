"""Property-based fuzzing of the whole API from its own OpenAPI description: no input, however
odd, may produce a 5xx or break the error shape."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.generation.modes import GenerationMode

pytestmark = pytest.mark.fuzz


@schemathesis.serializer("multipart/related")
def _stow_body(_ctx, value) -> bytes:
    """STOW-RS bodies as the fuzzer makes them: raw bytes, sent as they are (no boundary, odd
    parts: the receiver must refuse them with a 4xx, never fail)."""
    if isinstance(value, bytes):
        return value
    return str(value).encode("utf-8", "surrogatepass")


def _checker(label: str, strategy, headers: dict[str, str]):
    @given(case=strategy)
    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    def check(case) -> None:
        response = case.call(headers=headers)
        assert response.status_code < 500, (label, response.text[:500])
        if response.status_code >= 400 and label != "GET /readyz":
            body = response.json()
            assert set(body) == {"error"}, (label, body)
            assert set(body["error"]) == {"code", "message"}

    return check


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_server_errors(app, auth_headers, mode) -> None:
    """Valid requests (positive) and requests that break the schema (negative) alike."""
    schema = schemathesis.openapi.from_wsgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 6
    for operation in operations:
        if mode == GenerationMode.NEGATIVE and operation.path in {"/healthz", "/readyz"}:
            continue  # no parameters: nothing to break
        _checker(operation.label, operation.as_strategy(mode), auth_headers)()


def test_openapi_is_published(client) -> None:
    spec = client.get("/openapi.json").get_json()
    assert spec["openapi"].startswith("3.")
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/images/{image_id}"} <= set(spec["paths"])
