"""API behaviour without workers: validation, storage, errors, pagination, reads.

Runs against a real Redis and real databases (SQLite, and PostgreSQL where reachable).
"""

from __future__ import annotations

import io
import uuid

import pytest
from sqlalchemy import func, select

from api.extensions import service
from cli.client import format_table, summary
from shared.db import utcnow
from shared.models import Chunk, Image, ImageStatus, JobStatus, Result, job_status
from tests.factories import (
    jpeg_bytes,
    mark_encrypted,
    png_bytes,
    png_declaring,
    post_files,
    truncated,
    with_key,
    zip_bytes,
)


def assert_error(resp, status: int, code: str) -> None:
    assert resp.status_code == status, resp.get_json()
    body = resp.get_json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str)
    assert body["error"]["message"]


def test_submit_stores_images_and_answers_202(client, app) -> None:
    files = [("a.png", png_bytes(1)), ("b.jpg", jpeg_bytes(2)), ("c.png", png_bytes(3))]
    resp = post_files(client, files, client_ref="ward 7 / batch 12")
    assert resp.status_code == 202
    body = resp.get_json()
    uuid.UUID(body["id"])
    assert resp.headers["Location"].endswith(f"/v1/jobs/{body['id']}")
    assert body["status"] == "queued"
    assert body["client_ref"] == "ward 7 / batch 12"
    assert [i["filename"] for i in body["images"]] == ["a.png", "b.jpg", "c.png"]
    with app.app_context():
        state = service.state
        for (_, content), image in zip(files, body["images"], strict=True):
            with state.sessions() as session:
                row = session.get(Image, image["id"])
                assert state.blobs.get(row.blob_key) == content
        with state.sessions() as session:
            chunks = session.scalars(select(Chunk).where(Chunk.job_id == body["id"])).all()
            assert len(chunks) == 1  # chunk size 4 in the tests
            assert chunks[0].enqueued_at is not None


def test_chunking_follows_chunk_size(client, app) -> None:
    resp = post_files(client, [(f"{n}.png", png_bytes(n)) for n in range(9)])
    assert resp.status_code == 202
    with app.app_context(), service.state.sessions() as session:
        sizes = session.execute(
            select(func.count())
            .select_from(Image)
            .where(Image.job_id == resp.get_json()["id"])
            .group_by(Image.chunk_id)
        ).scalars()
        assert sorted(sizes) == [1, 4, 4]


def test_zip_is_expanded_in_order(client) -> None:
    archive = zip_bytes(
        {"x/1.png": png_bytes(1), "x/2.png": png_bytes(2), "__MACOSX/._1.png": b"junk"}
    )
    resp = post_files(client, [("films.zip", archive)])
    assert resp.status_code == 202
    assert [i["filename"] for i in resp.get_json()["images"]] == ["x/1.png", "x/2.png"]


def test_bad_images_fail_at_the_door_and_the_rest_is_accepted(client) -> None:
    files = [
        ("ok.png", png_bytes(1)),
        ("empty.png", b""),
        ("notes.png", b"this is a text file, not an image"),
        ("half.png", truncated(png_bytes(2))),
    ]
    resp = post_files(client, files)
    assert resp.status_code == 202
    images = {i["filename"]: i for i in resp.get_json()["images"]}
    assert images["ok.png"]["status"] == "queued"
    assert images["empty.png"]["error"]["code"] == "empty_image"
    assert images["notes.png"]["error"]["code"] == "not_an_image"
    assert images["half.png"]["error"]["code"] == "truncated_image"
    job = client.get(resp.headers["Location"]).get_json()
    assert job["counts"] == {
        "queued": 1,
        "running": 0,
        "completed": 0,
        "failed": 3,
        "skipped": 0,
    }
    assert job["status"] == "running"


def test_bad_files_each_get_their_own_failure(client) -> None:
    pdf = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << >>\n%%EOF\n"
    files = [
        ("ok.png", png_bytes(1)),
        ("scan.png", pdf),
        ("half.jpg", truncated(jpeg_bytes(2))),
        ("bomb.png", png_declaring(40000, 40000)),
        ("gif.png", b"GIF89a" + bytes(40)),
    ]
    assert len(files[3][1]) < 5000
    resp = post_files(client, files)
    assert resp.status_code == 202
    codes = {i["filename"]: (i["error"] or {}).get("code") for i in resp.get_json()["images"]}
    assert codes == {
        "ok.png": None,
        "scan.png": "not_an_image",
        "half.jpg": "truncated_image",
        "bomb.png": "image_too_large",
        "gif.png": "not_an_image",
    }


def test_encrypted_zip_entry(client) -> None:
    archive = mark_encrypted(zip_bytes({"a.png": png_bytes(1)}))
    assert_error(post_files(client, [("a.zip", archive)]), 400, "encrypted_zip_entry")


def test_empty_multipart_body(client) -> None:
    resp = client.post("/v1/jobs", data=b"", content_type="multipart/form-data; boundary=xyz")
    assert_error(resp, 400, "no_files")


def test_multipart_body_without_a_boundary(client) -> None:
    """Nothing can be split out of it: no files, and the client is told where they go."""
    resp = client.post("/v1/jobs", data=b"garbage", content_type="multipart/form-data")
    assert_error(resp, 400, "no_files")


def test_all_bad_images_make_a_failed_job(client) -> None:
    resp = post_files(client, [("a.png", b""), ("b.png", b"nope")])
    assert resp.status_code == 202
    assert client.get(resp.headers["Location"]).get_json()["status"] == "failed"


@pytest.mark.parametrize(
    ("kwargs", "status", "code"),
    [
        ({"json": {"files": []}}, 400, "bad_request"),  # JSON is for pulls from the PACS
        ({"data": b"raw", "content_type": "image/png"}, 415, "unsupported_media_type"),
        ({"data": {}, "content_type": "multipart/form-data"}, 400, "no_files"),
        ({"data": {"other": "a.png"}, "content_type": "multipart/form-data"}, 400, "no_files"),
    ],
)
def test_submission_errors(client, kwargs, status, code) -> None:
    assert_error(client.post("/v1/jobs", **kwargs), status, code)


def test_files_in_the_wrong_field(client) -> None:
    resp = client.post(
        "/v1/jobs",
        data={"other": (io.BytesIO(png_bytes(1)), "a.png")},
        content_type="multipart/form-data",
    )
    assert_error(resp, 400, "no_files")


def test_limits(service_env, redis_url, api_key) -> None:
    from api import create_app
    from shared.settings import load_settings

    settings = load_settings(
        {
            **service_env,
            "CXR_MAX_FILES_PER_JOB": "2",
            "CXR_MAX_FILE_BYTES": "50000",
            "CXR_MAX_REQUEST_BYTES": "400000",
        }
    )
    client = with_key(create_app(settings).test_client(), api_key)
    small = png_bytes(1, height=40, width=40)
    assert_error(post_files(client, [("a.png", small)] * 3), 413, "too_many_files")
    big = b"\x89PNG\r\n\x1a\n" + b"\0" * 60000
    assert_error(post_files(client, [("big.png", big)]), 413, "file_too_large")
    huge = b"\0" * 500000
    assert_error(post_files(client, [("huge.png", huge)]), 413, "request_too_large")
    assert_error(
        post_files(client, [("a.zip", zip_bytes({f"{n}.png": small for n in range(3)}))]),
        413,
        "too_many_files",
    )


def test_client_ref_too_long(client) -> None:
    assert_error(
        post_files(client, [("a.png", png_bytes(1))], client_ref="x" * 501),
        400,
        "invalid_parameter",
    )


@pytest.mark.parametrize(
    ("entries", "code"),
    [
        ({"../evil.png": b"x"}, "unsafe_zip_entry"),
        ({"/etc/evil.png": b"x"}, "unsafe_zip_entry"),
        ({"inner.zip": "NESTED"}, "nested_zip"),
    ],
)
def test_unsafe_zips(client, entries, code) -> None:
    entries = {
        k: (zip_bytes({"a.png": png_bytes(1)}) if v == "NESTED" else v) for k, v in entries.items()
    }
    assert_error(post_files(client, [("a.zip", zip_bytes(entries))]), 400, code)


def test_corrupt_zip(client) -> None:
    assert_error(post_files(client, [("a.zip", b"PK\x03\x04garbage")]), 400, "invalid_zip")


def test_symlink_in_zip(client) -> None:
    link = zip_bytes({"link.png": b"/etc/passwd"}, external_attr=(0o120777 << 16))
    assert_error(post_files(client, [("a.zip", link)]), 400, "unsafe_zip_entry")


def test_zip_bomb(client) -> None:
    bomb = zip_bytes({"bomb.png": b"\0" * 20_000_000})
    assert len(bomb) < 100_000
    assert_error(post_files(client, [("bomb.zip", bomb)]), 400, "zip_bomb")


def test_get_job_paginates(client) -> None:
    job_id = post_files(client, [(f"{n}.png", png_bytes(n)) for n in range(7)]).get_json()["id"]
    body = client.get(f"/v1/jobs/{job_id}?page=2&per_page=3").get_json()
    assert [i["filename"] for i in body["images"]] == ["3.png", "4.png", "5.png"]
    assert body["pagination"] == {"page": 2, "per_page": 3, "total": 7, "pages": 3}
    assert body["image_count"] == 7
    assert body["progress"] == 0.0
    last = client.get(f"/v1/jobs/{job_id}?page=3&per_page=3").get_json()
    assert [i["filename"] for i in last["images"]] == ["6.png"]
    beyond = client.get(f"/v1/jobs/{job_id}?page=9&per_page=3").get_json()
    assert beyond["images"] == []


def test_get_job_with_per_page_0_is_the_summary_alone(client) -> None:
    job_id = post_files(client, [(f"{n}.png", png_bytes(n)) for n in range(3)]).get_json()["id"]
    body = client.get(f"/v1/jobs/{job_id}?per_page=0").get_json()
    assert body["images"] == []
    assert body["pagination"] == {"page": 1, "per_page": 0, "total": 3, "pages": 0}
    assert body["counts"]["queued"] == 3


@pytest.mark.parametrize(
    "query",
    [
        "per_page=-1",
        "per_page=1000000000",
        "per_page=501",
        "page=0",
        "page=abc",
        "status=done",
    ],
)
def test_bad_pagination(client, query) -> None:
    job_id = post_files(client, [("a.png", png_bytes(1))]).get_json()["id"]
    assert_error(client.get(f"/v1/jobs/{job_id}?{query}"), 400, "invalid_parameter")


@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("/v1/jobs/not-a-uuid", "job_not_found"),
        (f"/v1/jobs/{uuid.uuid4()}", "job_not_found"),
        (f"/v1/jobs/{uuid.uuid4()}/results.csv", "job_not_found"),
        ("/v1/images/123", "image_not_found"),
        (f"/v1/images/{uuid.uuid4()}", "image_not_found"),
        ("/nowhere", "not_found"),
    ],
)
def test_not_found(client, path, code) -> None:
    assert_error(client.get(path), 404, code)


def test_method_not_allowed_is_json(client) -> None:
    assert_error(client.delete("/v1/jobs"), 405, "method_not_allowed")


def test_image_and_csv_reads(client) -> None:
    body = post_files(client, [("a.png", png_bytes(1)), ("bad.png", b"")]).get_json()
    image = client.get(f"/v1/images/{body['images'][1]['id']}").get_json()
    assert image["job_id"] == body["id"]
    assert image["status"] == "failed"
    assert image["error"]["code"] == "empty_image"
    csv_resp = client.get(f"/v1/jobs/{body['id']}/results.csv")
    assert csv_resp.status_code == 200
    assert csv_resp.mimetype == "text/csv"
    lines = csv_resp.get_data(as_text=True).strip().splitlines()
    assert lines[0].startswith("image_id,filename,status,probability,label")
    assert len(lines) == 3
    assert ",bad.png,failed,,,empty_image," in lines[2]


def test_skipped_image_shows_its_reason_and_no_probability(client, app) -> None:
    """A worker's outcome written straight into the rows (as ``worker.processing`` writes it):
    one image completed with its result, one skipped as out of scope."""
    body = post_files(
        client, [("chest.png", png_bytes(1)), ("lateral.png", png_bytes(2))]
    ).get_json()
    done_id, skipped_id = (i["id"] for i in body["images"])
    with app.app_context(), service.state.sessions.begin() as session:
        done = session.get(Image, done_id)
        done.status, done.finished_at = ImageStatus.COMPLETED, utcnow()
        session.add(
            Result(image_id=done_id, probability=0.25, label="non-covid", model_version="test")
        )
        skipped = session.get(Image, skipped_id)
        skipped.status, skipped.finished_at = ImageStatus.SKIPPED, utcnow()
        skipped.error_code = "not_frontal_chest_xray"
        skipped.error_message = "not a frontal chest radiograph: not two lung fields"

    job = client.get(f"/v1/jobs/{body['id']}").get_json()
    assert job["status"] == "completed"
    assert job["counts"] == {"queued": 0, "running": 0, "completed": 1, "failed": 0, "skipped": 1}
    assert job["progress"] == 1.0
    assert job["completed_at"] is not None
    by_name = {i["filename"]: i for i in job["images"]}
    assert by_name["lateral.png"]["status"] == "skipped"
    assert by_name["lateral.png"]["probability"] is None
    assert by_name["lateral.png"]["label"] is None
    assert by_name["lateral.png"]["error"] == {
        "code": "not_frontal_chest_xray",
        "message": "not a frontal chest radiograph: not two lung fields",
    }
    assert by_name["chest.png"]["error"] is None
    assert by_name["chest.png"]["probability"] == 0.25

    only = client.get(f"/v1/jobs/{body['id']}?status=skipped").get_json()
    assert [i["filename"] for i in only["images"]] == ["lateral.png"]
    image = client.get(f"/v1/images/{skipped_id}").get_json()
    assert image["status"] == "skipped"
    assert image["error"]["code"] == "not_frontal_chest_xray"
    assert image["probability"] is None
    assert image["model_version"] is None

    lines = client.get(f"/v1/jobs/{body['id']}/results.csv").get_data(as_text=True).splitlines()
    assert len(lines) == 3
    assert lines[2] == (
        f"{skipped_id},lateral.png,skipped,,,not_frontal_chest_xray,"
        "not a frontal chest radiograph: not two lung fields,,,,,"  # no model, no DICOM UIDs
    )

    # what `cxr wait` / `cxr results` print from the same answer
    assert summary(job["counts"]) == "1 completed, 0 failed, 1 skipped (out of scope)"
    table = format_table(job["images"]).splitlines()
    assert "skipped" in table[2]
    assert "not_frontal_chest_xray: not a frontal chest radiograph" in table[2]
    assert "0.250" in table[1]


@pytest.mark.parametrize(
    ("counts", "status"),
    [
        ({"completed": 2, "skipped": 1}, JobStatus.COMPLETED),
        ({"skipped": 3}, JobStatus.COMPLETED),
        ({"completed": 1, "skipped": 1, "failed": 1}, JobStatus.COMPLETED_WITH_ERRORS),
        ({"skipped": 1, "failed": 1}, JobStatus.COMPLETED_WITH_ERRORS),
        ({"failed": 2}, JobStatus.FAILED),
        ({"skipped": 1, "running": 1}, JobStatus.RUNNING),
        ({"skipped": 1, "queued": 1}, JobStatus.RUNNING),
        ({"queued": 2, "skipped": 0}, JobStatus.QUEUED),
        ({"completed": 1, "failed": 1}, JobStatus.COMPLETED_WITH_ERRORS),
    ],
)
def test_job_status_counts_skipped_images_as_finished(counts, status) -> None:
    full = {s.value: 0 for s in ImageStatus} | counts
    assert job_status(full) == status
    assert job_status(counts) == status


def test_long_and_unicode_filenames(client) -> None:
    files = [
        ("é" * 400 + ".png", png_bytes(1)),
        ("x\ty\u0007.png", png_bytes(2)),
        ("same.png", png_bytes(3)),
        ("same.png", png_bytes(4)),
    ]
    body = post_files(client, files).get_json()
    names = [i["filename"] for i in body["images"]]
    assert len(names[0]) <= 255
    assert names[0].endswith(".png")
    assert names[1] == "xy.png"
    assert names[2] == names[3] == "same.png"
    assert body["images"][2]["id"] != body["images"][3]["id"]


def test_health(client) -> None:
    assert client.get("/healthz").get_json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.get_json()
    assert ready.get_json()["checks"] == {"database": "ok", "redis": "ok", "model": "ok"}


def test_readyz_reports_redis_down(service_env) -> None:
    from api import create_app
    from shared.redis_server import free_port
    from shared.settings import load_settings

    settings = load_settings({**service_env, "CXR_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})
    resp = create_app(settings).test_client().get("/readyz")
    assert resp.status_code == 503
    assert resp.get_json()["checks"]["redis"].startswith("error")


def test_client_ref_with_control_characters(client) -> None:
    resp = post_files(client, [("a.png", png_bytes(1))], client_ref="ward\x007")
    assert_error(resp, 400, "invalid_parameter")


@pytest.mark.parametrize("name", [".", "a/../../b.png"])
def test_odd_zip_entry_names_are_refused(client, name) -> None:
    """A file entry whose name names no file inside the archive: refused, never dropped
    silently (the client would get a job with fewer films than it sent)."""
    archive = zip_bytes({name: png_bytes(1), "ok.png": png_bytes(2)})
    assert_error(post_files(client, [("a.zip", archive)]), 400, "unsafe_zip_entry")


def test_folder_entry_of_the_archive_root_is_skipped(client) -> None:
    """``./`` is a folder, as ``x/`` is: not a film, and nothing to refuse."""
    archive = zip_bytes({"./": b"", "ok.png": png_bytes(2)})
    resp = post_files(client, [("a.zip", archive)])
    assert resp.status_code == 202, resp.get_json()
    assert [i["filename"] for i in resp.get_json()["images"]] == ["ok.png"]


def test_corrupt_deflate_data_in_a_zip(client) -> None:
    archive = bytearray(zip_bytes({"a.png": png_bytes(1, height=200, width=200)}))
    start = archive.index(b"a.png") + len("a.png")
    archive[start + 10 : start + 60] = b"\xff" * 50  # compressed stream destroyed
    assert_error(post_files(client, [("a.zip", bytes(archive))]), 400, "invalid_zip")


def test_more_files_than_flask_default_form_parts(client) -> None:
    tiny = png_bytes(1, height=2, width=2)
    resp = post_files(client, [(f"{n}.png", tiny) for n in range(1100)])
    assert resp.status_code == 202, resp.get_json()
    assert resp.get_json()["image_count"] == 1100


def test_database_down_is_a_503(service_env) -> None:
    from api import create_app
    from shared.redis_server import free_port
    from shared.settings import load_settings

    url = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/nowhere"
    app = create_app(load_settings({**service_env, "CXR_DATABASE_URL": url}))
    resp = app.test_client().get(
        f"/v1/jobs/{uuid.uuid4()}", headers={"Authorization": "Bearer cxr_something"}
    )
    assert_error(resp, 503, "database_unavailable")
