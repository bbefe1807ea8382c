"""Pull jobs at the API (api/pull.py): what may be asked, what is recorded, how it reads back.
The worker side, against a real PACS, is in tests/test_pacs_e2e.py."""

from __future__ import annotations

import json

import pytest

from shared.models import Job, JobStatus, PullStatus
from tests.factories import with_key

STUDY = "1.2.826.0.1.3680043.8.498.1"


@pytest.fixture
def pacs_client(service_env, api_key):
    """A client of an API configured with a PACS (nothing needs to listen there: the API only
    records the pull; a worker does it)."""
    from api import create_app
    from shared.settings import load_settings

    settings = load_settings({**service_env, "CXR_DICOMWEB_URL": "http://127.0.0.1:9/dicom-web"})
    return with_key(create_app(settings).test_client(), api_key)


def test_a_pull_by_study_is_accepted_and_recorded(pacs_client, db_sessions) -> None:
    resp = pacs_client.post(
        "/v1/jobs", json={"dicomweb": {"study_uids": [STUDY, STUDY]}, "client_ref": "ward 3"}
    )
    assert resp.status_code == 202, resp.get_json()
    body = resp.get_json()
    assert (body["source"], body["status"], body["image_count"]) == ("pull", "queued", 0)
    assert body["pull"] == {"status": "pending", "error_code": None}
    assert body["client_ref"] == "ward 3"
    with db_sessions() as session:
        job = session.get(Job, body["id"])
        assert json.loads(job.pull_request) == {"study_uids": [STUDY]}  # duplicates dropped


def test_a_pull_by_query_keeps_only_the_query(pacs_client, db_sessions) -> None:
    query = {"StudyDate": "20260101-20260107", "ModalitiesInStudy": "DX"}
    resp = pacs_client.post("/v1/jobs", json={"dicomweb": {"query": query}})
    assert resp.status_code == 202, resp.get_json()
    with db_sessions() as session:
        assert json.loads(session.get(Job, resp.get_json()["id"]).pull_request) == {"query": query}


@pytest.mark.parametrize("key", ["PatientID", "PatientName", "AccessionNumber", "PatientBirthDate"])
def test_a_query_by_patient_is_refused(pacs_client, key: str) -> None:
    resp = pacs_client.post("/v1/jobs", json={"dicomweb": {"query": {key: "DOE^JOHN"}}})
    assert resp.status_code == 400
    assert resp.get_json()["error"]["code"] == "invalid_parameter"
    assert "DOE^JOHN" not in resp.get_data(as_text=True)


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"dicomweb": {"study_uids": ["not a uid"]}}, 400, "invalid_parameter"),
        ({"dicomweb": {"study_uids": []}}, 400, "invalid_parameter"),
        (
            {"dicomweb": {"study_uids": [STUDY], "query": {"StudyDate": "20260101"}}},
            400,
            "invalid_parameter",
        ),
        ({"dicomweb": {}}, 400, "invalid_parameter"),
        ({"dicomweb": {"query": {"StudyDate": "2026'; DROP"}}}, 400, "invalid_parameter"),
        ({"something": "else"}, 400, "bad_request"),
        ([1, 2], 400, "bad_request"),
    ],
)
def test_malformed_pull_requests_are_refused(pacs_client, body, status: int, code: str) -> None:
    resp = pacs_client.post("/v1/jobs", json=body)
    assert (resp.status_code, resp.get_json()["error"]["code"]) == (status, code)


def test_a_pull_needs_a_configured_pacs(client) -> None:
    resp = client.post("/v1/jobs", json={"dicomweb": {"study_uids": [STUDY]}})
    assert (resp.status_code, resp.get_json()["error"]["code"]) == (501, "pacs_not_configured")


@pytest.mark.parametrize(
    ("pull", "counts", "status"),
    [
        (PullStatus.PENDING, {}, JobStatus.QUEUED),
        (PullStatus.PENDING, {"completed": 2, "queued": 1}, JobStatus.RUNNING),
        (PullStatus.PENDING, {"completed": 2}, JobStatus.RUNNING),  # more may still come
        (PullStatus.FAILED, {}, JobStatus.FAILED),
        (PullStatus.DONE, {}, JobStatus.COMPLETED),  # the query matched nothing
        (PullStatus.DONE, {"completed": 1, "failed": 1}, JobStatus.COMPLETED_WITH_ERRORS),
    ],
)
def test_a_pull_jobs_status_follows_its_pull(pull, counts, status) -> None:
    from shared.models import job_status

    assert job_status(counts, pull) == status
