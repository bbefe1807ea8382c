"""Children's DICOM films: the age read from the header (PatientAge, else the birth date against
the study's date), the scope rule that skips a film of a patient under 18
(``pediatric_not_supported``), the door that takes that decision from the original header and
stores nothing of the film, and a search of everything the service writes for the age.

The model is trained and validated on adults only (MODEL_CARD.md); an age the header does not
tell, or tells unreadably, refuses nothing."""

from __future__ import annotations

import csv
import io

import pytest
import requests
from sqlalchemy import inspect, text

from shared import dicom
from shared.dicom import ADULT_AGE_YEARS
from shared.imaging import (
    PediatricNotSupportedError,
    PreprocessConfig,
    dicom_scope,
    preprocess,
)
from shared.ingest import NOTHING, ingest
from shared.models import ImageStatus, Job, new_id
from shared.planning import plan_job
from shared.settings import DEFAULT_MAX_PIXELS
from shared.storage import LocalBlobStore
from tests import dicom_factory as make
from tests.factories import bearer, post_files, submit_http, zip_bytes
from tests.service_client import result_rows, wait_done
from tests.test_dicom import NoSegmenter
from tests.test_stow import sop_uids, stow

CODE = "pediatric_not_supported"
#: What a child's film says about its patient; none of it may be found where the service writes.
CHILD = {
    "PatientName": "Child^Pediatric",
    "PatientAge": "006Y",
    "PatientBirthDate": "20180105",
    "StudyDate": "20240110",
}
ADULT = {"PatientName": "Adult^Grown", "PatientAge": "045Y", "PatientBirthDate": "19790105"}


def header(**attributes: str):
    """The header of a small generated DX film with these attributes (and no other patient
    or study attribute: the factory sets none)."""
    return dicom.read_header(make.mono8(make.film(1, 64, 64), **attributes))


def child_dicom(seed: int = 5, **attributes: str) -> bytes:
    return make.mono8(make.film(seed), **{**CHILD, **attributes})


# --------------------------------------------------------------------------- the age


@pytest.mark.parametrize(
    ("value", "years"),
    [
        ("006Y", 6.0),
        ("018Y", 18.0),
        ("045Y", 45.0),
        ("010M", 10 / 12),
        ("003W", 3 * 7 / 365.25),
        ("020D", 20 / 365.25),
        ("000D", 0.0),
        ("6Y", 6.0),  # not zero-padded, and unambiguous: read, so no child is missed for it
    ],
)
def test_patient_age_is_read_in_years(value: str, years: float) -> None:
    assert header(PatientAge=value).age_years == pytest.approx(years)


@pytest.mark.parametrize(
    "value", ["MARKER-7Q", "abcY", "06", "Y", "-05Y", "012X", "1234Y", "999Y", "151Y", "6 Y"]
)
def test_malformed_or_implausible_patient_age_gives_no_age(value: str) -> None:
    assert header(PatientAge=value).age_years is None
    assert dicom.header_scope(header(PatientAge=value)) is None  # no age refuses nothing


def test_birth_date_against_the_study_date_gives_the_age() -> None:
    age = header(PatientBirthDate="20100315", StudyDate="20240314").age_years
    assert age is not None
    assert 13.99 < age < 14
    # the 18th birthday is an adult's: calendar years, not days / 365.25
    assert header(PatientBirthDate="20060315", StudyDate="20240315").age_years == 18.0
    # born on 29 February: the birthday in a common year is 28 February
    assert header(PatientBirthDate="20040229", StudyDate="20220228").age_years == 18.0


@pytest.mark.parametrize("keyword", ["SeriesDate", "AcquisitionDate", "ContentDate"])
def test_the_first_present_date_of_the_film_is_used(keyword: str) -> None:
    age = header(PatientBirthDate="20200101", **{keyword: "20250101"}).age_years
    assert age == 5.0
    first = header(PatientBirthDate="20200101", StudyDate="20230101", **{keyword: "20250101"})
    assert first.age_years == 3.0


def test_patient_age_comes_before_the_dates() -> None:
    both = header(PatientAge="040Y", PatientBirthDate="20200101", StudyDate="20250101")
    assert both.age_years == 40.0
    unreadable = header(PatientAge="forty", PatientBirthDate="20200101", StudyDate="20250101")
    assert unreadable.age_years == 5.0  # an unreadable PatientAge does not hide a birth date


@pytest.mark.parametrize(
    "attributes",
    [
        pytest.param({"PatientBirthDate": "20100315"}, id="birth-date-without-a-study-date"),
        pytest.param({"StudyDate": "20240314"}, id="study-date-without-a-birth-date"),
        pytest.param({"PatientBirthDate": "20240315", "StudyDate": "20100314"}, id="before-birth"),
        pytest.param({"PatientBirthDate": "18000101", "StudyDate": "20240101"}, id="224-years"),
        pytest.param({"PatientBirthDate": "2010-03-15", "StudyDate": "20240314"}, id="not-DA"),
        pytest.param({"PatientBirthDate": "20100230", "StudyDate": "20240314"}, id="30-february"),
        pytest.param({"PatientBirthDate": "MARKER-7Q", "StudyDate": "20240314"}, id="garbage"),
        pytest.param({}, id="nothing"),
    ],
)
def test_dates_that_do_not_tell_an_age_give_none(attributes: dict[str, str]) -> None:
    assert header(**attributes).age_years is None


def test_the_header_keeps_the_derived_age_only_and_never_shows_it() -> None:
    read = header(**CHILD)
    assert read.age_years == 6.0
    shown = repr(read)
    assert "age_years" not in shown
    for raw in CHILD.values():
        assert raw not in shown
    assert not [v for v in vars(read).values() if isinstance(v, str) and v in CHILD.values()]


# --------------------------------------------------------------------------- the rule


def test_header_scope_skips_a_child_and_not_an_adult_or_an_unknown_age() -> None:
    refusal = dicom.header_scope(header(PatientAge="006Y"))
    assert isinstance(refusal, PediatricNotSupportedError)
    assert refusal.code == CODE
    assert dicom.header_scope(header(PatientAge="045Y")) is None
    assert dicom.header_scope(header(PatientAge="018Y")) is None
    assert dicom.header_scope(header(PatientAge="017Y")).code == CODE
    assert dicom.header_scope(header()) is None  # no PatientAge at all
    assert ADULT_AGE_YEARS == 18


def test_what_the_film_is_is_asked_before_whose_it_is() -> None:
    assert dicom.header_scope(header(PatientAge="006Y", Modality="CT")).code == (
        "not_chest_radiograph"
    )
    assert dicom.header_scope(header(PatientAge="006Y", ViewPosition="LL")).code == "not_frontal"


def test_the_pediatric_message_names_no_age_and_no_date() -> None:
    refusal = dicom.header_scope(header(**CHILD))
    assert refusal is not None
    assert refusal.message
    assert not [c for c in refusal.message if c.isdigit()], refusal.message
    for raw in CHILD.values():
        assert raw not in refusal.message


def test_a_raw_child_dicom_is_skipped_before_decoding_in_training_and_evaluation(tmp_path) -> None:
    """``cxr train`` and ``cxr evaluate`` read raw files through the one preprocessing path:
    the header refuses a child's film before any pixel is decoded or segmented."""
    data = child_dicom()
    with pytest.raises(PediatricNotSupportedError):
        dicom_scope(data)
    with pytest.raises(PediatricNotSupportedError) as caught:
        preprocess(data, PreprocessConfig(lung_crop=True), segmenter=NoSegmenter())
    assert caught.value.code == CODE

    from ml.dataset import Record, load_images

    (tmp_path / "child.dcm").write_bytes(data)
    (tmp_path / "adult.dcm").write_bytes(make.mono8(make.film(6), **ADULT))
    records = [Record("child.dcm", 0), Record("adult.dcm", 0)]
    loaded = load_images(tmp_path, records, PreprocessConfig(), DEFAULT_MAX_PIXELS)
    assert [r.file for r in loaded.skipped] == ["child.dcm"]
    assert [r.file for r in loaded.records] == ["adult.dcm"]
    assert not loaded.unreadable


# --------------------------------------------------------------------------- the door


def test_the_deidentified_file_holds_no_age_so_the_door_must_decide(tmp_path) -> None:
    clean, original = dicom.deidentify(child_dicom())
    assert original.age_years == 6.0
    assert dicom.read_header(clean).age_years is None
    for raw in CHILD.values():
        assert raw.encode() not in clean


def test_ingest_skips_a_child_at_the_door_storing_nothing_of_it(tmp_path) -> None:
    blobs = LocalBlobStore(tmp_path / "blobs")
    data = child_dicom()
    child = ingest(blobs, "job", 0, "child.dcm", data, DEFAULT_MAX_PIXELS)
    adult = ingest(
        blobs, "job", 1, "adult.dcm", make.mono8(make.film(6), **ADULT), DEFAULT_MAX_PIXELS
    )
    assert (child.status, child.error_code) == (ImageStatus.SKIPPED, CODE)
    assert blobs.get(child.blob_key) == NOTHING
    assert child.sop_instance_uid == dicom.read_header(data).sop_uid  # to answer the PACS
    assert adult.status == ImageStatus.QUEUED
    assert dicom.read_header(blobs.get(adult.blob_key)).age_years is None
    plan = plan_job(Job(id=new_id(), model_version="test"), [child, adult], chunk_size=4)
    assert child.chunk_id is None  # terminal at the door: no worker ever sees it
    assert adult.chunk_id == plan.chunk_ids[0]
    assert len(plan.chunks) == 1


def test_a_child_whose_header_fails_its_checks_fails_as_any_film_would(tmp_path) -> None:
    blobs = LocalBlobStore(tmp_path / "blobs")
    big = make.declaring(10_000, 10_000, **CHILD)
    image = ingest(blobs, "job", 0, "big.dcm", big, max_pixels=1_000_000)
    assert (image.status, image.error_code) == (ImageStatus.FAILED, "image_too_large")


def test_every_door_of_the_api_skips_a_child_at_once(client) -> None:
    """STOW-RS, a zip entry and a multipart file: the child is ``skipped`` as it is received,
    so a job of children only has ended before any worker runs (none runs here)."""
    data = child_dicom()
    resp = stow(client, [data])
    assert resp.status_code == 200  # received and answered: not a failed instance
    assert sop_uids(resp.get_json(force=True), "00081199") == [dicom.read_header(data).sop_uid]
    job_ids = [resp.headers["Content-Location"].rsplit("/", 1)[-1]]
    for files in ([("films.zip", zip_bytes({"a/child.dcm": data}))], [("child.dcm", data)]):
        answer = post_files(client, files)
        assert answer.status_code == 202, answer.get_json()
        job_ids.append(answer.get_json()["id"])
    for job_id in job_ids:
        job = client.get(f"/v1/jobs/{job_id}").get_json()
        assert job["status"] == "completed"
        assert job["counts"]["skipped"] == 1
        assert job["progress"] == 1.0
        (image,) = job["images"]
        assert (image["status"], image["error"]["code"]) == ("skipped", CODE)
        assert image["probability"] is None


# --------------------------------------------------------------------------- through the service


@pytest.mark.integration
def test_a_child_is_skipped_an_adult_scored_and_no_age_is_stored_anywhere(
    live_server, start_worker, api_key, database_url, db_sessions, settings, tmp_path
) -> None:
    start_worker()
    http = requests.Session()
    http.headers.update(bearer(api_key))
    files = [
        ("child.dcm", child_dicom()),
        ("adult.dcm", make.mono8(make.film(6), StudyDate="20240110", **ADULT)),
    ]
    job = submit_http(http, live_server, files)
    body = wait_done(http, live_server, job["id"])

    assert body["status"] == "completed"
    assert body["counts"] == {"queued": 0, "running": 0, "completed": 1, "failed": 0, "skipped": 1}
    by_name = {i["filename"]: i for i in body["images"]}
    child, adult = by_name["child.dcm"], by_name["adult.dcm"]
    assert (child["status"], child["error"]["code"]) == ("skipped", CODE)
    assert (child["probability"], child["label"]) == (None, None)
    assert not [c for c in child["error"]["message"] if c.isdigit()]
    assert adult["status"] == "completed"
    assert adult["probability"] is not None
    assert list(result_rows(database_url, job["id"])) == [adult["id"]]

    csv_text = http.get(f"{live_server}/v1/jobs/{job['id']}/results.csv", timeout=30).text
    rows = {row["filename"]: row for row in csv.DictReader(io.StringIO(csv_text))}
    assert (rows["child.dcm"]["status"], rows["child.dcm"]["error_code"]) == ("skipped", CODE)
    assert rows["child.dcm"]["probability"] == ""
    assert rows["adult.dcm"]["status"] == "completed"
    film = http.get(f"{live_server}/v1/images/{child['id']}/film.png", timeout=30)
    assert (film.status_code, film.json()["error"]["code"]) == (409, "image_unreadable")

    # nothing of either patient's age (nor a name) where the service writes or answers
    secrets = [*CHILD.values(), *ADULT.values()]
    with db_sessions() as session:
        tables = inspect(session.get_bind()).get_table_names()
        dump = [
            str(tuple(row))
            for table in tables
            for row in session.execute(text(f'SELECT * FROM "{table}"'))
        ]
    assert {"jobs", "images", "results"} <= set(tables)
    assert any(child["id"] in row for row in dump)  # the dump does hold the images
    assert not [(s, row) for s in secrets for row in dump if s in row]
    blobs = [p for p in settings.blob_path.rglob("*") if p.is_file()]
    assert len(blobs) == 2  # the adult's de-identified file, and the child's nothing
    assert b"" in [p.read_bytes() for p in blobs]
    assert not [(s, p) for s in secrets for p in blobs if s.encode() in p.read_bytes()]
    answers = [
        http.get(f"{live_server}/v1/jobs/{job['id']}", timeout=10).text,
        csv_text,
        *(http.get(f"{live_server}/v1/images/{i['id']}", timeout=10).text for i in body["images"]),
    ]
    assert not [(s, a) for s in secrets for a in answers if s in a]
    logs = list(tmp_path.glob("*.log"))
    assert logs
    assert not [(s, p) for s in secrets for p in logs if s in p.read_text(errors="replace")]
