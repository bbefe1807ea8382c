"""DICOM at the API: the DICOMweb STOW-RS receiver (api/dicomweb.py) and DICOM files sent as
uploads, through the Flask test client.  A real PACS pushing to us is in tests/test_pacs_e2e.py."""

from __future__ import annotations

import uuid

import pytest
from pydicom.uid import generate_uid

from shared.models import Image, Job
from tests.dicom_factory import MARKER, dicom_bytes, film, to_bytes, with_identity_everywhere
from tests.factories import png_bytes, post_files, zip_bytes

BOUNDARY = "cxr-test-boundary"
STOW_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'


def stow_body(instances: list[bytes]) -> bytes:
    out = b""
    for data in instances:
        out += f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data + b"\r\n"
    return out + f"--{BOUNDARY}--".encode()


def stow(client, instances: list[bytes], path: str = "/dicomweb/studies", **headers):
    return client.post(
        path, data=stow_body(instances), headers={"Content-Type": STOW_TYPE, **headers}
    )


def sop_uids(answer: dict, tag: str) -> list[str]:
    return [item["00081155"]["Value"][0] for item in answer.get(tag, {}).get("Value", [])]


def test_stored_instances_are_listed_and_become_one_job(client, db_sessions) -> None:
    study = generate_uid()
    uids = [generate_uid(), generate_uid()]
    instances = [
        dicom_bytes(film(n), StudyInstanceUID=study, SOPInstanceUID=uid)
        for n, uid in enumerate(uids)
    ]
    resp = stow(client, instances)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert resp.mimetype == "application/dicom+json"
    answer = resp.get_json(force=True)
    assert sop_uids(answer, "00081199") == uids
    assert "00081198" not in answer  # nothing failed
    job_id = resp.headers["Content-Location"].rsplit("/", 1)[-1]
    uuid.UUID(job_id)
    with db_sessions() as session:
        assert session.get(Job, job_id).source == "stow"
        rows = session.query(Image).filter_by(job_id=job_id).order_by(Image.position).all()
    assert [r.sop_instance_uid for r in rows] == uids
    assert {r.study_instance_uid for r in rows} == {study}
    job = client.get(f"/v1/jobs/{job_id}").get_json()
    assert [i["sop_instance_uid"] for i in job["images"]] == uids


def test_an_unreadable_part_is_failed_and_the_rest_stored(client) -> None:
    good = dicom_bytes(film(1))
    resp = stow(client, [good, b"DICM? no: " + b"\0" * 300])
    assert resp.status_code == 202  # PS3.18: some stored, some failed
    answer = resp.get_json(force=True)
    assert len(answer["00081199"]["Value"]) == 1
    assert answer["00081198"]["Value"][0]["00081197"]["Value"] == [0xC000]


def test_an_instance_of_another_study_than_the_path_is_refused(client) -> None:
    study, other = generate_uid(), generate_uid()
    resp = stow(
        client,
        [dicom_bytes(film(2), StudyInstanceUID=other)],
        path=f"/dicomweb/studies/{study}",
    )
    assert resp.status_code == 409  # none stored
    failed = resp.get_json(force=True)["00081198"]["Value"][0]
    assert failed["00081197"]["Value"] == [0xA900]


def test_identity_never_reaches_the_answer_the_job_or_the_blob_store(client, settings) -> None:
    resp = stow(client, [to_bytes(with_identity_everywhere(film(3)))])
    assert resp.status_code == 200
    assert MARKER not in resp.get_data(as_text=True)
    job = client.get(resp.headers["Content-Location"]).get_data(as_text=True)
    assert MARKER not in job
    stored = [p.read_bytes() for p in settings.blob_path.rglob("*") if p.is_file()]
    assert stored, "nothing was stored"
    assert not [b for b in stored if MARKER.encode() in b]


@pytest.mark.parametrize(
    ("content_type", "status", "code"),
    [
        ("multipart/form-data; boundary=x", 415, "unsupported_media_type"),
        (
            'multipart/related; type="application/dicom+json"; boundary=x',
            415,
            "unsupported_media_type",
        ),
        ('multipart/related; type="application/dicom"', 400, "bad_request"),
    ],
)
def test_bodies_that_are_not_dicom_instances_are_refused(
    client, content_type, status, code
) -> None:
    resp = client.post("/dicomweb/studies", data=b"x", headers={"Content-Type": content_type})
    assert (resp.status_code, resp.get_json()["error"]["code"]) == (status, code)


def test_an_empty_stow_is_refused(client) -> None:
    resp = client.post(
        "/dicomweb/studies", data=f"--{BOUNDARY}--".encode(), headers={"Content-Type": STOW_TYPE}
    )
    assert (resp.status_code, resp.get_json()["error"]["code"]) == (400, "no_files")


def test_stow_needs_an_api_key(app) -> None:
    resp = stow(app.test_client(), [dicom_bytes(film(4))])
    assert (resp.status_code, resp.get_json()["error"]["code"]) == (401, "missing_api_key")


def test_an_uploaded_dicom_keeps_its_uids_and_nothing_that_identifies(client, settings) -> None:
    ds = with_identity_everywhere(film(5))
    resp = post_files(client, [("film", to_bytes(ds))])  # no extension: DICOM by its content
    assert resp.status_code == 202
    (image,) = resp.get_json()["images"]
    assert image["status"] == "queued"
    assert (image["study_instance_uid"], image["sop_instance_uid"]) == (
        ds.StudyInstanceUID,
        ds.SOPInstanceUID,
    )
    csv = client.get(f"/v1/jobs/{resp.get_json()['id']}/results.csv").get_data(as_text=True)
    assert ds.SOPInstanceUID in csv
    assert MARKER not in csv
    stored = [p.read_bytes() for p in settings.blob_path.rglob("*") if p.is_file()]
    assert stored
    assert not [b for b in stored if MARKER.encode() in b]


def test_dicom_files_in_a_zip_are_read_as_dicom(client) -> None:
    archive = zip_bytes(
        {"study/IM0001": dicom_bytes(film(6)), "study/IM0002": dicom_bytes(film(7))}
    )
    resp = post_files(client, [("study.zip", archive)])
    assert resp.status_code == 202
    images = resp.get_json()["images"]
    assert [i["status"] for i in images] == ["queued", "queued"]
    assert all(i["sop_instance_uid"] for i in images)


def test_the_studies_of_a_job_list_each_study_once(client) -> None:
    study_a, study_b = generate_uid(), generate_uid()
    files = [
        ("a1", dicom_bytes(film(8), StudyInstanceUID=study_a)),
        ("b1", dicom_bytes(film(9), StudyInstanceUID=study_b)),
        ("a2", dicom_bytes(film(10), StudyInstanceUID=study_a)),
        ("plain.png", png_bytes(11)),
    ]
    job = post_files(client, files).get_json()
    studies = client.get(f"/v1/jobs/{job['id']}/studies").get_json()["studies"]
    assert [(s["study_instance_uid"], s["images"]) for s in studies] == [
        (study_a, 2),
        (study_b, 1),
    ]
    assert all(s["max_probability"] is None for s in studies)  # nothing scored yet


def test_the_access_log_masks_dicom_uids_but_keeps_our_ids() -> None:
    from api.access_log import mask_uids

    job = str(uuid.uuid4())
    assert mask_uids("/dicomweb/studies/1.2.826.0.1.3680043.8.498.12345") == (
        "/dicomweb/studies/{uid}"
    )
    assert mask_uids(f"/v1/jobs/{job}") == f"/v1/jobs/{job}"
