"""``GET /v1/images/{id}/heatmap.png``: rendered once by a real worker, then served from the blob
store and never cached by the browser; 409 for an image without a score, 404 for another
client's image, and a film that cannot be read any more costs no worker and answers 409
``heatmap_unavailable`` until its failure marker ends."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import redis as redis_lib
import requests

from shared.model_store import Classifier, read_model_info
from shared.queue import (
    HEATMAP_FAILED_SECONDS,
    PACS_QUEUE,
    heatmap_failed,
    heatmap_name,
    heatmap_rendered,
    make_celery,
)
from shared.storage import LocalBlobStore
from tests.dicom_factory import mono8
from tests.factories import (
    bearer,
    encode,
    make_job,
    make_key,
    png_bytes,
    post_files,
    score,
    submit,
    submit_http,
    truncated,
    xray_like,
)
from tests.service_client import wait_done, wait_for
from worker.heatmaps import render_heatmap

RENDERED = "heat map rendered"
#: What these tests check lives in Redis and the blob store, not in SQL: SQLite is enough.
SQLITE_ONLY = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


@pytest.fixture
def http(auth_headers: dict[str, str]) -> requests.Session:
    session = requests.Session()
    session.headers.update(auth_headers)
    return session


def _scored_image(http: requests.Session, url: str, film: bytes) -> str:
    job = submit_http(http, url, [("film.png", film)])
    (image,) = wait_done(http, url, job["id"])["images"]
    assert image["status"] == "completed", image
    return image["id"]


@pytest.mark.integration
def test_a_heat_map_is_rendered_once_then_served_from_the_cache(
    http, live_server, start_worker
) -> None:
    worker = start_worker()
    image_id = _scored_image(http, live_server, png_bytes(7, height=1400, width=1000))
    url = f"{live_server}/v1/images/{image_id}/heatmap.png"

    first = http.get(url, timeout=30)
    assert first.status_code == 202
    assert int(first.headers["Retry-After"]) >= 1
    assert first.json() == {"image_id": image_id, "status": "pending", "retry_after": 2}
    assert http.get(url, timeout=30).status_code in (200, 202)  # asked again while pending

    def rendered() -> requests.Response | None:
        answer = http.get(url, timeout=30)
        return answer if answer.status_code == 200 else None

    done = wait_for(rendered, 120, "the heat map", interval=0.5)
    assert done.headers["Content-Type"] == "image/png"
    assert done.headers["Cache-Control"] == "no-store"
    picture = cv2.imdecode(np.frombuffer(done.content, np.uint8), cv2.IMREAD_COLOR)
    assert picture.shape[:2] == (1024, 731)  # the film's 1400 x 1000, long side 1024
    assert picture.shape[0] / picture.shape[1] == pytest.approx(1400 / 1000, rel=0.01)

    again = http.get(url, timeout=30)
    assert again.status_code == 200
    assert again.content == done.content
    assert worker.log().count(RENDERED) == 1  # three requests, one rendering


@pytest.mark.integration
@SQLITE_ONLY
def test_a_film_that_cannot_be_read_any_more_clears_its_marker_and_spares_the_worker(
    http, live_server, start_worker, settings, db_sessions, redis_url
) -> None:
    from shared.models import Image

    worker = start_worker()
    image_id = _scored_image(http, live_server, png_bytes(8))
    with db_sessions() as session:
        key = session.get(Image, image_id).blob_key
    LocalBlobStore(settings.blob_path)._path(key).write_bytes(b"no longer this film")

    url = f"{live_server}/v1/images/{image_id}/heatmap.png"
    assert http.get(url, timeout=30).status_code == 202
    wait_for(lambda: "heat map failed (BlobCorruptError)" in worker.log(), 60, "the failure")
    model_version = read_model_info(settings.model_path).version
    marker = f"cxr:heatmap-failed:{heatmap_name(image_id, model_version)}"
    assert 0 < redis_lib.Redis.from_url(redis_url).ttl(marker) <= HEATMAP_FAILED_SECONDS
    assert worker.alive
    assert RENDERED not in worker.log()
    answer = http.get(url, timeout=30)  # not "pending" for ever: said, and no task sent
    assert (answer.status_code, answer.json()["error"]["code"]) == (409, "heatmap_unavailable")


def test_an_image_without_a_score_answers_409(client) -> None:
    """Failed at the door (a truncated file) or still queued (no worker runs here)."""
    job = submit(client, [("cut.png", truncated(png_bytes(1))), ("film.png", png_bytes(2))])
    statuses = {image["filename"]: image["status"] for image in job["images"]}
    assert statuses == {"cut.png": "failed", "film.png": "queued"}
    for image in job["images"]:
        resp = client.get(f"/v1/images/{image['id']}/heatmap.png")
        assert resp.status_code == 409
        assert resp.get_json()["error"]["code"] == "image_not_scored"


def test_another_clients_image_is_not_found(client, app, db_sessions) -> None:
    resp = post_files(client, [("film.png", png_bytes(3))])
    (image,) = resp.get_json()["images"]
    other = app.test_client()
    answer = other.get(
        f"/v1/images/{image['id']}/heatmap.png", headers=bearer(make_key(db_sessions, "other"))
    )
    assert answer.status_code == 404
    assert answer.get_json()["error"]["code"] == "image_not_found"


@pytest.fixture(scope="module")
def bundled_classifier() -> Classifier:
    from shared.settings import DEFAULT_MODEL_PATH

    return Classifier.load(DEFAULT_MODEL_PATH)


@SQLITE_ONLY
def test_a_dicom_film_gets_the_heat_map_of_the_same_film_as_png(
    db_sessions, settings, bundled_classifier
) -> None:
    """DICOM decodes through the same path: the same pixels, the same heat map, to the byte."""
    film = xray_like(9, height=300, width=256)
    blobs = LocalBlobStore(settings.blob_path)
    _, _, (as_png, as_dicom) = make_job(db_sessions, blobs, [encode(film), mono8(film)])
    keys = [
        render_heatmap(image_id, db_sessions, blobs, bundled_classifier, settings)
        for image_id in (as_png, as_dicom)
    ]
    assert keys[0] is not None
    assert keys[0] == keys[1]
    picture = cv2.imdecode(np.frombuffer(blobs.get(keys[0]), np.uint8), cv2.IMREAD_COLOR)
    assert picture.shape == (300, 256, 3)


def _scored(client, db_sessions, settings) -> tuple[str, str]:
    """An image of the test client scored by the model the API serves (no worker here):
    returns its id and that model's version."""
    version = read_model_info(settings.model_path).version
    (image,) = submit(client, [("film.png", png_bytes(4))])["images"]
    score(db_sessions, image["id"], version)
    return image["id"], version


def _pacs_queue_length(redis_url: str) -> int:
    return redis_lib.Redis.from_url(redis_url).llen(PACS_QUEUE)


@SQLITE_ONLY
def test_a_stored_heat_map_is_never_cached_by_the_browser(client, db_sessions, settings) -> None:
    image_id, version = _scored(client, db_sessions, settings)
    key = LocalBlobStore(settings.blob_path).put(png_bytes(5))
    heatmap_rendered(make_celery(settings), image_id, version, key)
    resp = client.get(f"/v1/images/{image_id}/heatmap.png")
    assert resp.status_code == 200
    assert resp.headers["Cache-Control"] == "no-store"
    assert "ETag" not in resp.headers
    assert "Last-Modified" not in resp.headers


@SQLITE_ONLY
def test_a_failed_rendering_answers_409_without_a_task_until_its_marker_ends(
    client, db_sessions, settings, redis_url
) -> None:
    image_id, version = _scored(client, db_sessions, settings)
    url = f"/v1/images/{image_id}/heatmap.png"
    store = redis_lib.Redis.from_url(redis_url)
    store.delete(PACS_QUEUE)
    assert client.get(url).status_code == 202
    assert _pacs_queue_length(redis_url) == 1  # the rendering, asked for once
    heatmap_failed(make_celery(settings), image_id, version)  # what the worker records
    for _ in range(3):  # a page polling it: told at once, every time, and nothing enqueued
        resp = client.get(url)
        assert resp.status_code == 409
        assert resp.get_json()["error"]["code"] == "heatmap_unavailable"
    assert _pacs_queue_length(redis_url) == 1
    marker = f"cxr:heatmap-failed:{heatmap_name(image_id, version)}"
    assert HEATMAP_FAILED_SECONDS - 5 < store.ttl(marker) <= HEATMAP_FAILED_SECONDS
    store.delete(marker)  # as when its TTL runs out
    assert client.get(url).status_code == 202
    assert _pacs_queue_length(redis_url) == 2  # asked again


def test_the_heat_map_failure_is_described_in_openapi(client) -> None:
    spec = client.get("/openapi.json").get_json()
    answers = spec["paths"]["/v1/images/{image_id}/heatmap.png"]["get"]["responses"]
    assert "heatmap_unavailable" in answers["409"]["description"]
