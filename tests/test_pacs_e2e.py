"""A real PACS (Orthanc with DICOMweb) against the running stack (API, worker, Redis, database):
studies pushed from it come back into it as Structured Reports; pull jobs fetch from it; and no
identifying attribute is found anywhere the service writes."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import requests
from dicomweb_client import DICOMwebClient
from pydicom.uid import JPEG2000Lossless, generate_uid
from sqlalchemy import select, text

from shared.models import Image, Job
from tests.dicom_factory import (
    MARKER,
    compressed,
    dataset,
    film,
    mono1_12bit,
    pacs_attributes,
    signed16,
    to_bytes,
    with_identity_everywhere,
)
from tests.factories import bearer
from tests.service_client import wait_done, wait_for

pytestmark = pytest.mark.integration

PATIENT = pacs_attributes(patient_id="E2E-1", PatientName="Test^E2E", StudyDate="20260105")
SR_MODALITY = {"Modality": "SR"}


@pytest.fixture
def service_env(service_env: dict[str, str], pacs) -> dict[str, str]:
    """This module's stack knows the PACS: reports go back to it, pulls come from it."""
    return {**service_env, "CXR_DICOMWEB_URL": pacs.dicomweb_url}


@pytest.fixture
def stack(live_server: str, api_key: str, start_worker, pacs):
    start_worker()
    http = requests.Session()
    http.headers.update(bearer(api_key))
    pacs.add_dicomweb_server("cxr", f"{live_server}/dicomweb", bearer=api_key)
    return live_server, http


def push(pacs, instances: list[bytes], study: str) -> None:
    for data in instances:
        pacs.upload(data)
    pacs.push_study("cxr", pacs.study_id(study))


def stow_job(db_sessions) -> str:
    def newest() -> str | None:
        with db_sessions() as session:
            return session.scalar(select(Job.id).where(Job.source == "stow"))

    return wait_for(newest, 30, "the pushed study's job")


def delivered(db_sessions, job_id: str, expected: int) -> list[Image]:
    def sent() -> list[Image] | None:
        with db_sessions() as session:
            rows = session.scalars(
                select(Image).where(Image.job_id == job_id, Image.pacs_delivery.is_not(None))
            ).all()
        done = [r for r in rows if r.pacs_delivery != "pending"]
        return done if len(done) == expected else None

    return wait_for(sent, 120, f"{expected} report(s) to reach the PACS", interval=0.3)


def reports_in(pacs, study: str) -> list:
    client = DICOMwebClient(url=pacs.dicomweb_url)
    found = client.search_for_instances(study_instance_uid=study, search_filters=SR_MODALITY)
    return [
        client.retrieve_instance(study, item["0020000E"]["Value"][0], item["00080018"]["Value"][0])
        for item in found
    ]


def sr_text(report) -> str:
    """Every value in the report's content tree, as one string to search."""
    out = []

    def walk(items) -> None:
        for item in items:
            for keyword in ("TextValue", "MeasuredValueSequence", "ConceptCodeSequence"):
                if keyword in item:
                    out.append(str(item[keyword].value))
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(report.ContentSequence)
    return "\n".join(out)


def test_a_pushed_study_is_screened_and_its_reports_come_back(stack, pacs, db_sessions) -> None:
    url, http = stack
    study = generate_uid()
    frontal = dataset(film(1), StudyInstanceUID=study, **PATIENT)
    lateral = dataset(film(2), StudyInstanceUID=study, ViewPosition="LL", **PATIENT)
    push(pacs, [to_bytes(frontal), to_bytes(lateral)], study)

    job = wait_done(http, url, stow_job(db_sessions))
    by_uid = {i["sop_instance_uid"]: i for i in job["images"]}
    assert by_uid[frontal.SOPInstanceUID]["status"] == "completed"
    assert by_uid[lateral.SOPInstanceUID]["status"] == "skipped"
    assert by_uid[lateral.SOPInstanceUID]["error"]["code"] == "not_frontal"
    (sent,) = delivered(db_sessions, job["id"], expected=1)  # skipped films get no report
    assert (sent.sop_instance_uid, sent.pacs_delivery) == (frontal.SOPInstanceUID, "sent")

    (report,) = reports_in(pacs, study)
    assert report.StudyInstanceUID == study
    assert report.PatientID == PATIENT["PatientID"]  # filed under the right patient
    assert report.SeriesInstanceUID not in (frontal.SeriesInstanceUID, lateral.SeriesInstanceUID)
    content = sr_text(report)
    assert "screening aid, not a diagnosis" in content
    assert job["model_version"] in content
    probability = by_uid[frontal.SOPInstanceUID]["probability"]
    assert f"{probability:.4f}"[:5] in content or str(round(probability, 4))[:5] in content
    studies = http.get(f"{url}/v1/jobs/{job['id']}/studies", timeout=10).json()["studies"]
    assert studies[0]["study_instance_uid"] == study
    assert studies[0]["max_probability"] == pytest.approx(probability)


def test_a_pull_job_fetches_a_study_by_uid_and_by_query(stack, pacs, db_sessions) -> None:
    url, http = stack
    wanted, other = generate_uid(), generate_uid()
    for n, (study, date) in enumerate(((wanted, "20260102"), (other, "20250101"))):
        pacs.upload(
            to_bytes(
                dataset(film(10 + n), StudyInstanceUID=study, **{**PATIENT, "StudyDate": date})
            )
        )
    ct = dataset(film(12), StudyInstanceUID=wanted, Modality="CT", **PATIENT)
    pacs.upload(to_bytes(ct))  # not a radiograph series: never pulled

    for body in (
        {"dicomweb": {"study_uids": [wanted]}},
        {"dicomweb": {"query": {"StudyDate": "20260101-20260107"}}},
    ):
        resp = http.post(f"{url}/v1/jobs", json=body, timeout=10)
        assert resp.status_code == 202, resp.text
        job = wait_done(http, url, resp.json()["id"])
        assert job["pull"] == {"status": "done", "error_code": None}
        assert [i["study_instance_uid"] for i in job["images"]] == [wanted]
        assert job["images"][0]["status"] == "completed"


@pytest.mark.realdata
def test_real_film_variants_from_the_pacs_score_alike(stack, pacs, db_sessions, real_data_dir):
    """One real film as the PACS may hold it: 8-bit, MONOCHROME1 12-bit, signed 16-bit with a
    rescale, JPEG 2000; plus its lateral and CT look-alikes, and one without ViewPosition."""
    import cv2

    url, http = stack
    with (real_data_dir / "manifest.csv").open() as fh:
        name = next(row["file"] for row in csv.DictReader(fh) if row["source"] == "nih")
    img = cv2.imread(str(real_data_dir / name), cv2.IMREAD_GRAYSCALE)
    img = cv2.resize(img, (512, 512), interpolation=cv2.INTER_AREA)
    study = generate_uid()
    names = ("mono8", "mono1", "signed", "j2k", "no_view", "lateral", "ct")
    uid = {name: generate_uid() for name in names}

    def common(name: str) -> dict:
        return {"StudyInstanceUID": study, "SOPInstanceUID": uid[name], **PATIENT}

    variants = [
        to_bytes(dataset(img, **common("mono8"))),
        mono1_12bit(img, **common("mono1")),
        signed16(img, **common("signed")),
        compressed(dataset(img, **common("j2k")), JPEG2000Lossless),
        to_bytes(dataset(img, ViewPosition=None, **common("no_view"))),
        to_bytes(dataset(img, ViewPosition="RL", **common("lateral"))),
        to_bytes(dataset(img, Modality="CT", **common("ct"))),
    ]
    push(pacs, variants, study)
    job = wait_done(http, url, stow_job(db_sessions), timeout=240)
    by_uid = {i["sop_instance_uid"]: i for i in job["images"]}
    by_name = {name: by_uid[uid[name]] for name in names}  # the PACS sends in its own order
    assert by_name["lateral"]["error"]["code"] == "not_frontal"
    assert by_name["ct"]["error"]["code"] == "not_chest_radiograph"
    scored = [by_name[k] for k in ("mono8", "mono1", "signed", "j2k", "no_view")]
    assert [i["status"] for i in scored] == ["completed"] * 5, scored
    probabilities = np.array([i["probability"] for i in scored])
    assert probabilities.max() - probabilities.min() <= 0.02


def test_no_identifying_attribute_is_found_anywhere_the_service_writes(
    stack, pacs, db_sessions, settings, tmp_path: Path
) -> None:
    url, http = stack
    ds = with_identity_everywhere(film(20))
    push(pacs, [to_bytes(ds)], ds.StudyInstanceUID)
    job_id = stow_job(db_sessions)
    job = wait_done(http, url, job_id)
    delivered(db_sessions, job_id, expected=1)

    answers = [
        http.get(f"{url}/v1/jobs/{job_id}", timeout=10).text,
        http.get(f"{url}/v1/jobs/{job_id}/results.csv", timeout=10).text,
        http.get(f"{url}/v1/jobs/{job_id}/studies", timeout=10).text,
        *(http.get(f"{url}/v1/images/{i['id']}", timeout=10).text for i in job["images"]),
    ]
    assert not [a for a in answers if MARKER in a]
    blobs = [p for p in settings.blob_path.rglob("*") if p.is_file()]
    assert blobs
    assert not [p for p in blobs if MARKER.encode() in p.read_bytes()]
    logs = list(tmp_path.glob("*.log"))
    assert logs
    assert not [p for p in logs if MARKER in p.read_text(errors="replace")]
    with db_sessions() as session:
        dump = []
        for table in ("jobs", "chunks", "images", "results", "api_keys"):
            dump += [str(row) for row in session.execute(text(f"SELECT * FROM {table}"))]
    assert dump
    assert not [row for row in dump if MARKER in row]
