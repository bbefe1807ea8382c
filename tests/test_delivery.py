"""Reports to the PACS (worker/delivery.py and its task, sweeper and enqueueing), against real
databases, a real Redis and a real Orthanc with its DICOMweb plugin (tests/orthanc.py); a tiny
local HTTP server stands in for the PACS only for the failures Orthanc cannot be made to give
(a 5xx, a refused STOW, a failure reason in the STOW answer)."""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import json
import logging
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pydicom
import pytest
import redis as redis_lib
from sqlalchemy import select, update

from shared.db import utcnow
from shared.dicomweb import (
    PacsNotFoundError,
    PacsUnavailableError,
    pacs_client,
    retrieve_instance_metadata,
)
from shared.model_store import ModelInfo, read_model_info
from shared.models import Chunk, ChunkStatus, Image, ImageStatus, PacsDelivery, Result
from shared.queue import PACS_QUEUE, enqueue_chunks, make_celery
from shared.redis_server import free_port
from shared.settings import DEFAULT_MODEL_PATH, Settings
from shared.storage import LocalBlobStore
from tests.dicom_factory import pacs_dataset, to_bytes
from tests.factories import make_job, png_bytes, truncated
from tests.orthanc import OrthancServer, orthanc_unavailable_reason
from worker.delivery import (
    INTERNAL_ERROR,
    PACS_NOT_CONFIGURED,
    PACS_REJECTED,
    PACS_UNREACHABLE,
    SOURCE_NOT_IN_PACS,
    deliver,
    fail,
    give_up,
    report_uids,
)
from worker.sweeper import find_stranded_deliveries, sweep, sweep_deliveries

UNAVAILABLE = orthanc_unavailable_reason()
needs_orthanc = pytest.mark.skipif(UNAVAILABLE is not None, reason=str(UNAVAILABLE))
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    if UNAVAILABLE is not None:
        pytest.skip(UNAVAILABLE)
    with OrthancServer(tmp_path_factory.mktemp("orthanc")) as server:
        yield server


@pytest.fixture(scope="module")
def model() -> ModelInfo:
    return read_model_info(DEFAULT_MODEL_PATH, verify=False)


@pytest.fixture
def blobs(settings: Settings) -> LocalBlobStore:
    return LocalBlobStore(settings.blob_path)


Uids = tuple[str, str, str, str]  # study, series, sop, sop class


def uids_of(ds: pydicom.Dataset) -> Uids:
    return ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.SOPClassUID


def set_source(session, image_id: str, uids: Uids, **values: object) -> None:
    """Give the image the UIDs of its DICOM source (and any other column ``values``)."""
    study, series, sop, sop_class = uids
    session.execute(
        update(Image)
        .where(Image.id == image_id)
        .values(
            study_instance_uid=study,
            series_instance_uid=series,
            sop_instance_uid=sop,
            sop_class_uid=sop_class,
            **values,
        )
    )


def scored_image(
    sessions,
    blobs,
    uids: Uids,
    model: ModelInfo,
    *,
    label: str = "covid",
    probability: float = 0.81,
    delivery: PacsDelivery | None = PacsDelivery.PENDING,
    finished_at: dt.datetime | None = None,
    attempted_at: dt.datetime | None = None,
) -> str:
    """An image as a worker leaves it after scoring a DICOM input: completed, with its result,
    its source's UIDs, and its report owed to the PACS."""
    _, (chunk_id,), (image_id,) = make_job(sessions, blobs, [png_bytes(1)])
    with sessions.begin() as session:
        # its chunk is done too, as the worker leaves it (a queued one would be dispatched)
        session.execute(update(Chunk).where(Chunk.id == chunk_id).values(status=ChunkStatus.DONE))
        set_source(
            session,
            image_id,
            uids,
            status=ImageStatus.COMPLETED,
            finished_at=finished_at or utcnow(),
            pacs_delivery=delivery,
            pacs_attempted_at=attempted_at,
        )
        session.add(
            Result(
                image_id=image_id,
                probability=probability,
                label=label,
                model_version=model.version,
            )
        )
    return image_id


def delivery_of(sessions, image_id: str) -> tuple[str | None, str | None, dt.datetime | None]:
    with sessions() as session:
        image = session.get(Image, image_id)
        return image.pacs_delivery, image.pacs_error_code, image.pacs_attempted_at


def with_pacs(settings: Settings, url: str) -> Settings:
    return dataclasses.replace(settings, dicomweb_url=url)


def dead_url() -> str:
    """A DICOMweb URL where nothing listens: connection refused."""
    return f"http://127.0.0.1:{free_port()}/dicom-web"


# -- against Orthanc ----------------------------------------------------------------------------


def reports_in(client, study_uid: str) -> list[dict]:
    """QIDO-RS: the SR instances Orthanc holds in the study."""
    found = client.search_for_instances(study_instance_uid=study_uid)
    return [i for i in found if i["00080016"]["Value"][0] == COMPREHENSIVE_SR]


@needs_orthanc
@pytest.mark.integration
def test_the_report_reaches_the_pacs_in_the_source_study(
    orthanc, db_sessions, blobs, settings, model, caplog
) -> None:
    caplog.set_level(logging.DEBUG)
    source = pacs_dataset(patient_id="PAT-DELIVERY-1", seed=1)
    orthanc.upload(to_bytes(source))
    image_id = scored_image(db_sessions, blobs, uids_of(source), model)
    client = pacs_client(with_pacs(settings, orthanc.dicomweb_url))

    caplog.clear()
    assert deliver(image_id, db_sessions, client, settings, model=model) == PacsDelivery.SENT
    # nothing that identifies the patient or the source reached the logs, at any level
    for secret in (
        "PAT-DELIVERY-1",
        "Test^Orthanc",
        source.SOPInstanceUID,
        source.StudyInstanceUID,
    ):
        assert secret not in caplog.text

    state, code, attempted = delivery_of(db_sessions, image_id)
    assert (state, code) == (PacsDelivery.SENT, None)
    assert attempted is not None
    (found,) = reports_in(client, source.StudyInstanceUID)
    series_uid, sop_uid = report_uids(image_id)
    assert found["00080018"]["Value"] == [sop_uid]
    assert found["0020000E"]["Value"] == [series_uid]
    sr = client.retrieve_instance(source.StudyInstanceUID, series_uid, sop_uid)
    assert sr.PatientID == "PAT-DELIVERY-1"
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    finding = sr.ContentSequence[0]
    assert finding.ConceptCodeSequence[0].CodeMeaning == "COVID-19 suspected"
    numbers = {
        item.ConceptNameCodeSequence[0].CodeMeaning: float(
            item.MeasuredValueSequence[0].NumericValue
        )
        for item in finding.ContentSequence
        if item.ValueType == "NUM"
    }
    assert numbers == {
        "Probability": pytest.approx(0.81),
        "Threshold Value": pytest.approx(model.threshold),
    }


@needs_orthanc
@pytest.mark.integration
def test_a_delivered_report_is_not_sent_again(orthanc, db_sessions, blobs, settings, model) -> None:
    source = pacs_dataset(seed=2)
    orthanc.upload(to_bytes(source))
    image_id = scored_image(db_sessions, blobs, uids_of(source), model, label="non-covid")
    client = pacs_client(with_pacs(settings, orthanc.dicomweb_url))
    assert deliver(image_id, db_sessions, client, settings, model=model) == PacsDelivery.SENT
    before = delivery_of(db_sessions, image_id)

    # a redelivered task: not pending any more, so the PACS is not even asked
    nowhere = pacs_client(with_pacs(settings, dead_url()))
    assert deliver(image_id, db_sessions, nowhere, settings, model=model) == PacsDelivery.SENT
    assert delivery_of(db_sessions, image_id) == before

    # a duplicate that raced the first one sends the same instance: the PACS keeps one
    with db_sessions.begin() as session:
        session.execute(
            update(Image).where(Image.id == image_id).values(pacs_delivery=PacsDelivery.PENDING)
        )
    assert deliver(image_id, db_sessions, client, settings, model=model) == PacsDelivery.SENT
    assert len(reports_in(client, source.StudyInstanceUID)) == 1


@needs_orthanc
@pytest.mark.integration
def test_a_source_the_pacs_does_not_hold_fails_the_delivery(
    orthanc, db_sessions, blobs, settings, model
) -> None:
    never_uploaded = pacs_dataset(seed=3)
    image_id = scored_image(db_sessions, blobs, uids_of(never_uploaded), model)
    client = pacs_client(with_pacs(settings, orthanc.dicomweb_url))
    assert deliver(image_id, db_sessions, client, settings, model=model) == PacsDelivery.FAILED
    assert delivery_of(db_sessions, image_id)[:2] == (PacsDelivery.FAILED, SOURCE_NOT_IN_PACS)
    assert orthanc.study_id(never_uploaded.StudyInstanceUID) is None  # nothing was stored


# -- failures, against a stand-in ------------------------------------------------------------


class FakePacs:
    """A DICOMweb server that answers GET (WADO-RS metadata) and POST (STOW-RS) as told, and
    counts the requests."""

    def __init__(self) -> None:
        self.get: tuple[int, object] = (503, {})
        self.post: tuple[int, object] = (503, {})
        self.requests: list[str] = []
        self.auth: list[str | None] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, status: int, body: object) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                fake.requests.append("GET")
                fake.auth.append(self.headers.get("Authorization"))
                self._answer(*fake.get)

            def do_POST(self) -> None:
                fake.requests.append("POST")
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self._answer(*fake.post)

            def log_message(self, *_args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}/dicom-web"


@pytest.fixture
def fake_pacs() -> Iterator[FakePacs]:
    fake = FakePacs()
    fake.thread.start()
    yield fake
    fake.server.shutdown()
    fake.thread.join(5)


def metadata_json(ds: pydicom.Dataset) -> list[dict]:
    """WADO-RS metadata as a PACS sends it: a JSON array of one dataset, pixel data by URI."""
    return [
        ds.to_json_dict(bulk_data_threshold=256, bulk_data_element_handler=lambda _e: "http://x/b")
    ]


@pytest.fixture
def pending_image(db_sessions, blobs, model) -> tuple[str, pydicom.Dataset]:
    source = pacs_dataset(seed=4)
    return scored_image(db_sessions, blobs, uids_of(source), model), source


def test_the_client_exists_only_with_a_url_and_authenticates_with_a_username(
    fake_pacs,
) -> None:
    assert pacs_client(Settings()) is None
    fake_pacs.get = (404, {})
    for username, expected in (("", None), ("cxr", "Basic Y3hyOnNlY3JldA==")):
        client = pacs_client(
            Settings(
                dicomweb_url=fake_pacs.url, dicomweb_username=username, dicomweb_password="secret"
            )
        )
        with pytest.raises(PacsNotFoundError):
            retrieve_instance_metadata(client, "1.2.3", "1.2.4", "1.2.5")
        assert fake_pacs.auth[-1] == expected


def test_an_unreachable_pacs_is_transient_and_the_delivery_stays_pending(
    db_sessions, settings, model, pending_image
) -> None:
    image_id, _ = pending_image
    client = pacs_client(with_pacs(settings, dead_url()))
    with pytest.raises(PacsUnavailableError):
        deliver(image_id, db_sessions, client, settings, model=model)
    state, code, attempted = delivery_of(db_sessions, image_id)
    assert (state, code) == (PacsDelivery.PENDING, None)
    assert attempted is not None  # the attempt is recorded: the sweeper sees progress


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_a_server_error_is_transient(
    db_sessions, settings, model, pending_image, fake_pacs, method: str
) -> None:
    image_id, source = pending_image
    fake_pacs.get = (500, {}) if method == "GET" else (200, metadata_json(source))
    fake_pacs.post = (503, {})
    client = pacs_client(with_pacs(settings, fake_pacs.url))
    with pytest.raises(PacsUnavailableError):
        deliver(image_id, db_sessions, client, settings, model=model)
    assert delivery_of(db_sessions, image_id)[0] == PacsDelivery.PENDING
    assert fake_pacs.requests[-1] == method


@pytest.mark.parametrize(
    ("get", "post", "code"),
    [
        ((404, {}), None, SOURCE_NOT_IN_PACS),
        ((200, []), None, SOURCE_NOT_IN_PACS),  # an empty answer: nothing there
        ((403, {}), None, PACS_REJECTED),
        (None, (409, {}), PACS_REJECTED),  # STOW-RS: every instance failed
        (None, (400, {}), PACS_REJECTED),
        (None, "failed-sop:0xC000", PACS_REJECTED),  # 200, but our instance is in FailedSOP
    ],
    ids=["wado-404", "wado-empty", "wado-403", "stow-409", "stow-400", "stow-failed-sop"],
)
def test_a_refusal_fails_the_delivery(
    db_sessions, settings, model, pending_image, fake_pacs, get, post, code: str
) -> None:
    image_id, source = pending_image
    fake_pacs.get = get or (200, metadata_json(source))
    if post == "failed-sop:0xC000":
        post = (200, stow_answer_failing(image_id, 0xC000))
    fake_pacs.post = post or (200, {})
    client = pacs_client(with_pacs(settings, fake_pacs.url))
    assert deliver(image_id, db_sessions, client, settings, model=model) == PacsDelivery.FAILED
    assert delivery_of(db_sessions, image_id)[:2] == (PacsDelivery.FAILED, code)


def stow_answer_failing(image_id: str, reason: int) -> dict:
    """A STOW-RS answer whose FailedSOPSequence names this image's report."""
    item = pydicom.Dataset()
    item.ReferencedSOPClassUID = COMPREHENSIVE_SR
    item.ReferencedSOPInstanceUID = report_uids(image_id)[1]
    item.FailureReason = reason
    answer = pydicom.Dataset()
    answer.FailedSOPSequence = [item]
    return answer.to_json_dict()


def test_a_pacs_out_of_resources_is_transient(
    db_sessions, settings, model, pending_image, fake_pacs
) -> None:
    image_id, source = pending_image
    fake_pacs.get = (200, metadata_json(source))
    fake_pacs.post = (200, stow_answer_failing(image_id, 0xA700))
    client = pacs_client(with_pacs(settings, fake_pacs.url))
    with pytest.raises(PacsUnavailableError):
        deliver(image_id, db_sessions, client, settings, model=model)
    assert delivery_of(db_sessions, image_id)[0] == PacsDelivery.PENDING


def test_a_worker_without_a_pacs_fails_the_delivery(
    db_sessions, settings, model, pending_image
) -> None:
    image_id, _ = pending_image
    assert deliver(image_id, db_sessions, None, settings, model=model) == PacsDelivery.FAILED
    assert delivery_of(db_sessions, image_id)[:2] == (PacsDelivery.FAILED, PACS_NOT_CONFIGURED)


def test_giving_up_ends_the_delivery_once(db_sessions, settings, model, pending_image) -> None:
    image_id, _ = pending_image
    assert give_up(image_id, db_sessions) == PacsDelivery.FAILED
    assert delivery_of(db_sessions, image_id)[:2] == (PacsDelivery.FAILED, PACS_UNREACHABLE)
    # a late execution changes nothing, whatever it would have concluded
    assert fail(image_id, db_sessions, INTERNAL_ERROR) == PacsDelivery.FAILED
    nowhere = pacs_client(with_pacs(settings, dead_url()))
    assert deliver(image_id, db_sessions, nowhere, settings, model=model) == PacsDelivery.FAILED
    assert delivery_of(db_sessions, image_id)[:2] == (PacsDelivery.FAILED, PACS_UNREACHABLE)


def test_an_image_with_nothing_to_deliver_is_left_alone(
    db_sessions, blobs, settings, model
) -> None:
    image_id = scored_image(db_sessions, blobs, uids_of(pacs_dataset()), model, delivery=None)
    nowhere = pacs_client(with_pacs(settings, dead_url()))
    assert deliver(image_id, db_sessions, nowhere, settings, model=model) == "none"
    assert delivery_of(db_sessions, image_id) == (None, None, None)


def test_the_task_retries_a_pacs_error_then_gives_up(
    db_sessions, settings, model, pending_image, fake_pacs, monkeypatch
) -> None:
    """The Celery task (run eagerly, so its retries run at once): every retry asks the PACS
    again; once they are spent the delivery fails as ``pacs_unreachable``."""
    from worker import tasks

    image_id, _ = pending_image
    fake_pacs.get = (503, {})
    client = pacs_client(with_pacs(settings, fake_pacs.url))
    monkeypatch.setattr(tasks, "get_settings", lambda: settings)
    monkeypatch.setattr(tasks, "sessions", lambda: db_sessions)
    monkeypatch.setattr(tasks, "pacs", lambda: client)
    monkeypatch.setattr(tasks, "model_info", lambda: model)
    tasks.deliver_report.apply(args=[image_id])
    assert fake_pacs.requests == ["GET"] * (tasks.DELIVERY_MAX_RETRIES + 1)
    assert delivery_of(db_sessions, image_id)[:2] == (PacsDelivery.FAILED, PACS_UNREACHABLE)


def test_the_task_ends_a_delivery_that_fails_unexpectedly(
    db_sessions, settings, model, pending_image, monkeypatch
) -> None:
    from worker import tasks

    image_id, _ = pending_image

    def broken(*_args: object, **_kwargs: object) -> str:
        raise RuntimeError("a bug")

    monkeypatch.setattr(tasks, "get_settings", lambda: settings)
    monkeypatch.setattr(tasks, "sessions", lambda: db_sessions)
    monkeypatch.setattr(tasks, "pacs", lambda: None)
    monkeypatch.setattr(tasks, "model_info", lambda: model)
    monkeypatch.setattr(tasks, "deliver", broken)
    tasks.deliver_report.apply(args=[image_id])
    assert delivery_of(db_sessions, image_id)[:2] == (PacsDelivery.FAILED, INTERNAL_ERROR)


# -- scoring makes reports pending; the sweeper resends lost ones -------------------------------


@pytest.fixture(scope="module")
def classifier():
    from shared.model_store import Classifier

    return Classifier.load(DEFAULT_MODEL_PATH)


def score(
    db_sessions, blobs, classifier, settings, uids: list[Uids | None], images: list[bytes]
) -> tuple[list[str], list[list[str]], object]:
    """One chunk of ``images`` (DICOM where ``uids`` says so) through process_chunk; returns
    (image ids, the batches of ids handed to send_reports, the outcome)."""
    from worker.processing import process_chunk

    _, (chunk_id,), ids = make_job(db_sessions, blobs, images)
    with db_sessions.begin() as session:
        for image_id, these in zip(ids, uids, strict=True):
            if these is not None:
                set_source(session, image_id, these)
    sent: list[list[str]] = []

    def send_reports(image_ids) -> None:  # must only see committed rows
        with db_sessions() as session:
            states = session.scalars(
                select(Image.pacs_delivery).where(Image.id.in_(image_ids))
            ).all()
        assert states == [PacsDelivery.PENDING] * len(image_ids)
        sent.append(list(image_ids))

    outcome = process_chunk(
        chunk_id, db_sessions, blobs, lambda: classifier, settings, send_reports=send_reports
    )
    return ids, sent, outcome


def states(db_sessions, ids: list[str]) -> list[tuple[str, str | None]]:
    with db_sessions() as session:
        rows = {
            r.id: (r.status, r.pacs_delivery)
            for r in session.scalars(select(Image).where(Image.id.in_(ids)))
        }
    return [rows[i] for i in ids]


def test_scoring_makes_the_reports_of_completed_dicom_images_pending(
    db_sessions, blobs, classifier, settings
) -> None:
    from tests.test_processing import one_lung_field

    dicom = [uids_of(pacs_dataset()) for _ in range(3)]
    ids, sent, outcome = score(
        db_sessions,
        blobs,
        classifier,
        with_pacs(settings, dead_url()),  # never contacted by scoring
        [dicom[0], None, dicom[1], dicom[2]],
        [png_bytes(1), png_bytes(2), truncated(png_bytes(3)), one_lung_field(7)],
    )
    assert states(db_sessions, ids) == [
        (ImageStatus.COMPLETED, PacsDelivery.PENDING),
        (ImageStatus.COMPLETED, None),  # not DICOM: no study to report into
        (ImageStatus.FAILED, None),
        (ImageStatus.SKIPPED, None),
    ]
    assert sent == [[ids[0]]]
    assert outcome.reports_pending == 1


def test_without_a_pacs_scoring_owes_no_report(db_sessions, blobs, classifier, settings) -> None:
    assert not settings.dicomweb_url
    ids, sent, outcome = score(
        db_sessions, blobs, classifier, settings, [uids_of(pacs_dataset())], [png_bytes(1)]
    )
    assert states(db_sessions, ids) == [(ImageStatus.COMPLETED, None)]
    assert (sent, outcome.reports_pending) == ([], 0)


def report_queue(redis_url: str) -> list[str]:
    """The image ids of the delivery tasks waiting in Redis (kombu's message: JSON with the
    base64 body ``[args, kwargs, embed]``)."""
    raw = redis_lib.Redis.from_url(redis_url).lrange(PACS_QUEUE, 0, -1)
    return [json.loads(base64.b64decode(json.loads(m)["body"]))[0][0] for m in raw]


def test_the_sweeper_resends_deliveries_stranded_pending(
    db_sessions, blobs, settings, model, redis_url
) -> None:
    now = utcnow()
    long_ago = now - dt.timedelta(seconds=settings.lease_seconds + 5)
    dicom = uids_of(pacs_dataset())
    stranded = scored_image(db_sessions, blobs, dicom, model, finished_at=long_ago)
    scored_image(db_sessions, blobs, dicom, model)  # just scored: its task may be on its way
    scored_image(db_sessions, blobs, dicom, model, finished_at=long_ago, attempted_at=now)
    scored_image(db_sessions, blobs, dicom, model, finished_at=long_ago, delivery=PacsDelivery.SENT)
    scored_image(db_sessions, blobs, dicom, model, finished_at=long_ago, delivery=None)
    celery = make_celery(settings)

    assert sweep(celery, db_sessions, settings) == 0  # no chunk to resend; the delivery is
    assert report_queue(redis_url) == [stranded]
    # it is in the queue now: while the queue holds something, only a lost message is resent
    assert sweep_deliveries(celery, db_sessions, settings) == 0
    with db_sessions() as session:
        assert find_stranded_deliveries(session, settings, queue_empty=True) == [stranded]


def test_the_sweeper_resends_a_delivery_lost_while_the_queue_was_busy(
    db_sessions, blobs, settings, model, redis_url
) -> None:
    lost_long_ago = utcnow() - dt.timedelta(seconds=settings.visibility_timeout + 5)
    stale = utcnow() - dt.timedelta(seconds=settings.lease_seconds + 5)
    dicom = uids_of(pacs_dataset())
    lost = scored_image(db_sessions, blobs, dicom, model, finished_at=lost_long_ago)
    scored_image(db_sessions, blobs, dicom, model, finished_at=stale)  # may be queued
    redis_lib.Redis.from_url(redis_url).lpush(PACS_QUEUE, b"another delivery")
    assert sweep_deliveries(make_celery(settings), db_sessions, settings) == 1
    with db_sessions() as session:
        assert find_stranded_deliveries(session, settings, queue_empty=False) == [lost]


# -- the whole way: a worker scores a DICOM image and its report lands in Orthanc -------------


@needs_orthanc
@pytest.mark.integration
def test_a_worker_scores_and_reports_to_the_pacs(
    orthanc, db_sessions, blobs, settings, start_worker, redis_url
) -> None:
    """The classify task enqueues the delivery on the report queue after its commit; the same
    worker (started with ``-Q cxr`` only) consumes it and stores the SR in Orthanc."""
    source = pacs_dataset(patient_id="PAT-E2E", seed=9)
    orthanc.upload(to_bytes(source))
    _, chunk_ids, (image_id,) = make_job(db_sessions, blobs, [png_bytes(5)])
    with db_sessions.begin() as session:
        set_source(session, image_id, uids_of(source))
    worker = start_worker(CXR_DICOMWEB_URL=orthanc.dicomweb_url)
    assert enqueue_chunks(make_celery(settings), db_sessions, chunk_ids) == 1
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        state = delivery_of(db_sessions, image_id)[0]
        if state in (PacsDelivery.SENT, PacsDelivery.FAILED):
            break
        time.sleep(0.25)
    assert delivery_of(db_sessions, image_id)[:2] == (PacsDelivery.SENT, None), worker.log()[-3000:]
    client = pacs_client(with_pacs(settings, orthanc.dicomweb_url))
    (found,) = reports_in(client, source.StudyInstanceUID)
    assert found["00080018"]["Value"] == [report_uids(image_id)[1]]
    assert "PAT-E2E" not in worker.log()
    assert source.SOPInstanceUID not in worker.log()
