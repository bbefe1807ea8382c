"""The API's error catalogue (api/errors.py) is the one source of its error codes: the README
table, the OpenAPI description and every call site agree with it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from flask import Flask, abort

from api.errors import APIError, ErrorCode, register_error_handlers
from api.openapi import build_spec

ROOT = Path(__file__).resolve().parent.parent
TABLE_HEADER = "| code | HTTP status | meaning |"


def readme_table() -> list[tuple[str, int, str]]:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert lines.count(TABLE_HEADER) == 1, "the README has one error-code table"
    start = lines.index(TABLE_HEADER) + 2  # past the header and its --- row
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        assert len(cells) == 3, line
        code, status, meaning = cells
        match = re.fullmatch(r"`([a-z_]+)`", code)
        assert match, f"the code cell {code!r} is not `code`"
        rows.append((match.group(1), int(status), meaning))
    return rows


def catalogue() -> list[tuple[str, int, str]]:
    return [(code.value, code.status, code.meaning) for code in ErrorCode]


def test_catalogue_is_well_formed() -> None:
    assert len({code.value for code in ErrorCode}) == len(ErrorCode)
    for code in ErrorCode:
        assert re.fullmatch(r"[a-z]+(_[a-z]+)*", code.value), code
        assert code == code.value  # a str: the JSON body carries it as is
        assert 400 <= code.status < 600, code
        assert code.meaning.strip(), code
        assert "|" not in code.meaning, code  # one README table cell
        assert "\n" not in code.meaning, code


def test_readme_table_equals_the_catalogue() -> None:
    table = readme_table()
    documented = {code for code, _, _ in table}
    defined = {code.value for code in ErrorCode}
    assert not defined - documented, f"missing from the README: {sorted(defined - documented)}"
    assert not documented - defined, f"not in the catalogue: {sorted(documented - defined)}"
    assert len(table) == len(documented), "a code appears twice in the README table"
    assert table == catalogue()  # statuses and meanings too, in the catalogue's order


def test_readme_keeps_per_image_codes_out_of_the_table() -> None:
    documented = {code for code, _, _ in readme_table()}
    for image_code in ("empty_image", "corrupt_image", "not_frontal_chest_xray"):
        assert image_code not in documented


def test_openapi_lists_exactly_the_catalogue() -> None:
    spec = build_spec(max_per_page=500)
    code_schema = spec["components"]["schemas"]["Error"]["properties"]["error"]["properties"][
        "code"
    ]
    assert code_schema["enum"] == [code.value for code in ErrorCode]
    listed = dict(re.findall(r"^- `([a-z_]+)` \((\d{3})\): ", code_schema["description"], re.M))
    assert listed == {code.value: str(code.status) for code in ErrorCode}


def test_openapi_error_responses_use_catalogue_statuses() -> None:
    spec = build_spec(max_per_page=500)
    seen = set()
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            for status, response in operation["responses"].items():
                schema = response.get("content", {}).get("application/json", {}).get("schema")
                if schema != {"$ref": "#/components/schemas/Error"}:
                    continue
                codes = re.findall(r"^- `([a-z_]+)`: ", response["description"], re.M)
                assert codes, (path, method, status)
                for code in codes:
                    assert ErrorCode(code).status == int(status), (path, method, code)
                seen.update(codes)
    assert {"missing_api_key", "no_files", "job_not_found", "image_not_found"} <= seen


def _api_sources() -> dict[str, str]:
    return {p.name: p.read_text(encoding="utf-8") for p in sorted((ROOT / "api").glob("*.py"))}


def test_every_api_error_names_a_catalogue_member() -> None:
    """No call site types a status or a code: the first argument is never a literal."""
    calls = 0
    for name, source in _api_sources().items():
        for node in ast.walk(ast.parse(source)):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            callee = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
            if callee in {"APIError", "error_response"}:
                calls += 1
                assert node.args, (name, node.lineno)
                assert not isinstance(node.args[0], ast.Constant), (name, node.lineno)
                assert len(node.args) + len(node.keywords) == 2, (name, node.lineno)
    assert calls >= 20


def test_every_catalogue_member_is_answered_somewhere() -> None:
    """No dead entries: each member is raised or returned by the API (openapi.py aside)."""
    used = "\n".join(src for name, src in _api_sources().items() if name != "openapi.py")
    for code in ErrorCode:
        assert f"ErrorCode.{code.name}" in used, code


@pytest.fixture
def tiny_app() -> Flask:
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = 10
    register_error_handlers(app)

    @app.get("/raise/<name>")
    def raise_(name: str) -> str:
        raise APIError(ErrorCode[name], f"because {name}")

    @app.get("/abort/<int:status>")
    def abort_(status: int) -> str:
        abort(status)

    @app.get("/boom")
    def boom() -> str:
        raise RuntimeError("boom")

    @app.get("/leak/<name>")
    def leak(name: str) -> str:
        raise ValueError(f"cannot read {name}")

    return app


@pytest.mark.parametrize("code", list(ErrorCode))
def test_api_error_answers_with_the_catalogue_status(tiny_app, code) -> None:
    resp = tiny_app.test_client().get(f"/raise/{code.name}")
    assert resp.status_code == code.status
    assert resp.get_json() == {"error": {"code": code.value, "message": f"because {code.name}"}}
    assert APIError(code, "m").status == code.status
    if code.status == 401:
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (400, ErrorCode.BAD_REQUEST),
        (404, ErrorCode.NOT_FOUND),
        (405, ErrorCode.METHOD_NOT_ALLOWED),
        (413, ErrorCode.REQUEST_TOO_LARGE),
        (415, ErrorCode.UNSUPPORTED_MEDIA_TYPE),
        (418, ErrorCode.BAD_REQUEST),  # any other 4xx
        (501, ErrorCode.INTERNAL_ERROR),  # any other 5xx
    ],
)
def test_http_errors_answer_with_catalogue_members(tiny_app, status, code) -> None:
    assert ErrorCode.for_http_status(status) is code
    resp = tiny_app.test_client().get(f"/abort/{status}")
    assert resp.status_code == code.status
    body = resp.get_json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == code.value
    assert body["error"]["message"]


def test_routing_and_unexpected_errors_answer_with_catalogue_members(tiny_app) -> None:
    client = tiny_app.test_client()
    assert client.get("/nowhere").get_json()["error"]["code"] == "not_found"
    resp = client.post("/boom")
    assert (resp.status_code, resp.get_json()["error"]["code"]) == (405, "method_not_allowed")
    resp = client.get("/boom")
    assert (resp.status_code, resp.get_json()["error"]["code"]) == (500, "internal_error")


def test_an_unhandled_error_is_logged_by_type_and_place_never_by_message(tiny_app, caplog) -> None:
    with caplog.at_level("ERROR", logger="api.errors"):
        resp = tiny_app.test_client().get("/leak/patient-smith-1942.png")
    assert resp.status_code == 500
    assert "patient-smith-1942.png" not in resp.get_data(as_text=True)
    logged = "\n".join(r.getMessage() + (r.exc_text or "") for r in caplog.records)
    assert "ValueError" in logged
    assert "in leak" in logged  # where it happened
    assert "patient-smith-1942.png" not in logged
