"""End to end with real parts: HTTP API, Redis, Celery worker processes, SQLite/PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import requests

from shared.imaging import preprocess
from shared.model_store import Classifier
from tests.factories import jpeg_bytes, png_bytes, submit_http, truncated
from tests.service_client import result_rows, wait_done

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def reference_classifier() -> Classifier:
    from shared.settings import DEFAULT_MODEL_PATH

    return Classifier.load(DEFAULT_MODEL_PATH)


@pytest.fixture
def http(auth_headers: dict[str, str]) -> requests.Session:
    session = requests.Session()
    session.headers.update(auth_headers)
    return session


def test_submit_poll_and_results_match_the_model(
    http, live_server, start_worker, database_url, reference_classifier
) -> None:
    start_worker()
    good = [(f"film-{n}.png", png_bytes(n, height=200 + 37 * n, width=256)) for n in range(7)]
    good += [("film-j.jpg", jpeg_bytes(99))]
    bad = [("corrupt.png", truncated(png_bytes(50))), ("empty.jpg", b""), ("text.png", b"hello")]
    job = submit_http(http, live_server, good + bad)
    body = wait_done(http, live_server, job["id"])

    assert body["status"] == "completed_with_errors"
    assert body["counts"] == {
        "queued": 0,
        "running": 0,
        "completed": 8,
        "failed": 3,
        "skipped": 0,
    }
    assert body["progress"] == 1.0
    assert body["completed_at"] is not None
    by_name = {i["filename"]: i for i in body["images"]}
    ref = reference_classifier
    expected = ref.predict(
        np.stack([preprocess(d, ref.info.preprocess, segmenter=ref.segmenter) for _, d in good])
    )
    for (name, _), prob in zip(good, expected, strict=True):
        image = by_name[name]
        assert image["status"] == "completed"
        assert image["probability"] == pytest.approx(float(prob), abs=1e-5)
        assert image["label"] == reference_classifier.info.label(float(prob))
        assert image["error"] is None
    assert by_name["corrupt.png"]["error"]["code"] == "truncated_image"
    assert by_name["empty.jpg"]["error"]["code"] == "empty_image"
    assert by_name["text.png"]["error"]["code"] == "not_an_image"
    for name, _ in bad:
        assert by_name[name]["probability"] is None

    rows = result_rows(database_url, job["id"])
    assert len(rows) == 8
    assert set(rows.values()) == {1}

    csv_text = http.get(f"{live_server}/v1/jobs/{job['id']}/results.csv", timeout=30).text
    assert len(csv_text.strip().splitlines()) == 1 + 11


def test_corrupt_pixel_data_fails_only_that_image(http, live_server, start_worker) -> None:
    """A file whose header is fine but whose pixels are not reaches the worker and fails there."""
    start_worker()
    ok = png_bytes(1)
    broken = bytearray(png_bytes(2))
    idat = broken.index(b"IDAT")
    broken[idat + 8 : idat + 200] = bytes(192)  # zlib stream destroyed, IEND intact
    job = submit_http(http, live_server, [("ok.png", ok), ("broken.png", bytes(broken))])
    body = wait_done(http, live_server, job["id"])
    by_name = {i["filename"]: i for i in body["images"]}
    assert by_name["ok.png"]["status"] == "completed"
    assert by_name["broken.png"]["status"] == "failed"
    assert by_name["broken.png"]["error"]["code"] == "corrupt_image"
    assert body["status"] == "completed_with_errors"


def test_non_chest_image_ends_skipped_through_the_service(
    http, live_server, start_worker, database_url, reference_classifier
) -> None:
    """A generated document and a noise frame are not frontal chest films: the job completes,
    with them ``skipped`` (code ``not_frontal_chest_xray``), no probability and no result row."""
    from ml.synthetic import generate
    from ml.synthetic import png_bytes as synthetic_png

    assert reference_classifier.info.preprocess.lung_crop, "the bundled model checks scope"
    start_worker()
    files = [
        ("film.png", png_bytes(3)),
        ("letter.png", synthetic_png(generate("document", 1))),
        ("noise.png", synthetic_png(generate("noise", 2))),
    ]
    job = submit_http(http, live_server, files)
    body = wait_done(http, live_server, job["id"])
    assert body["status"] == "completed"
    assert body["counts"]["completed"] == 1
    assert body["counts"]["skipped"] == 2
    by_name = {i["filename"]: i for i in body["images"]}
    assert by_name["film.png"]["status"] == "completed"
    for name in ("letter.png", "noise.png"):
        assert by_name[name]["status"] == "skipped"
        assert by_name[name]["error"]["code"] == "not_frontal_chest_xray"
        assert by_name[name]["probability"] is None
        assert by_name[name]["label"] is None
    assert len(result_rows(database_url, job["id"])) == 1


def test_two_workers_share_a_big_job(http, live_server, start_worker, database_url) -> None:
    w1 = start_worker(wait=False)
    w2 = start_worker(wait=False)
    w1.wait_ready()
    w2.wait_ready()
    files = [(f"{n}.png", png_bytes(n, height=120, width=120)) for n in range(40)]
    job = submit_http(http, live_server, files)
    body = wait_done(http, live_server, job["id"])
    assert body["status"] == "completed"
    assert body["counts"]["completed"] == 40
    rows = result_rows(database_url, job["id"])
    assert len(rows) == 40
    assert set(rows.values()) == {1}
    # both processes took chunks from the one queue
    assert " completed, " in w1.log()
    assert " completed, " in w2.log()


def test_client_commands(live_server, start_worker, api_key, tmp_path: Path, capsys) -> None:
    from cli.main import main

    start_worker()
    folder = tmp_path / "films"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.png").write_bytes(png_bytes(1))
    (folder / "sub" / "b.jpg").write_bytes(jpeg_bytes(2))
    (folder / "readme.txt").write_text("not sent")
    assert main(["submit", str(folder), "--url", live_server, "--api-key", api_key]) == 0
    job_id = capsys.readouterr().out.strip().splitlines()[-1]
    assert (
        main(
            [
                "wait",
                job_id,
                "--url",
                live_server,
                "--api-key",
                api_key,
                "--interval",
                "0.3",
                "--timeout",
                "180",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "a.png" in out
    assert "b.jpg" in out
    assert "completed" in out
    assert main(["results", job_id, "--csv", "--url", live_server, "--api-key", api_key]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 3


def test_no_patient_data_in_logs_or_task_messages(
    http, live_server, start_worker, redis_url, caplog
) -> None:
    import base64
    import json
    import logging
    import uuid

    import redis as redis_lib

    caplog.set_level(logging.DEBUG)
    name, ref = "DOE^JOHN_1970-01-01_chest.png", "MRN-4455-SECRET"
    job = submit_http(http, live_server, [(name, png_bytes(1))], data={"client_ref": ref})
    messages = redis_lib.Redis.from_url(redis_url).lrange("cxr", 0, -1)
    assert len(messages) == 1
    raw = messages[0].decode()
    envelope = json.loads(raw)
    args, kwargs, _ = json.loads(base64.b64decode(envelope["body"]))
    assert kwargs == {}
    assert len(args) == 1
    uuid.UUID(args[0])  # a chunk id, nothing else
    assert "DOE" not in raw
    assert ref not in raw

    worker = start_worker()
    assert wait_done(http, live_server, job["id"])["status"] == "completed"
    logged = worker.log() + "\n".join(
        r.getMessage() for r in caplog.records if r.levelno >= logging.INFO
    )
    assert job["id"] in logged or args[0] in logged  # the logs are there, and speak in ids
    assert "DOE" not in logged
    assert ref not in logged
