"""``GET /metrics`` (cluster gauges from Redis and the database) and a worker's own metrics port."""

from __future__ import annotations

import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import update

from shared.db import utcnow
from shared.models import Image, ImageStatus
from shared.redis_server import free_port
from tests.factories import png_files, submit


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of a Prometheus text exposition."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _set_status(db_sessions, image_id: str, status: ImageStatus) -> None:
    with db_sessions.begin() as session:
        session.execute(
            update(Image).where(Image.id == image_id).values(status=status, finished_at=utcnow())
        )


def test_metrics_reports_queue_images_and_throughput(app, client, db_sessions) -> None:
    job = submit(client, png_files(6))  # CXR_CHUNK_SIZE=4: two chunks, both enqueued
    ids = [image["id"] for image in job["images"]]
    _set_status(db_sessions, ids[0], ImageStatus.COMPLETED)
    _set_status(db_sessions, ids[1], ImageStatus.COMPLETED)
    _set_status(db_sessions, ids[2], ImageStatus.FAILED)

    resp = app.test_client().get("/metrics")  # no API key, like /healthz
    assert resp.status_code == 200
    assert resp.content_type.startswith("text/plain")
    values = samples(resp.get_data(as_text=True))
    assert values[("cxr_queue_depth", (("queue", "cxr"),))] == 2
    assert values[("cxr_queue_depth", (("queue", "cxr-pacs"),))] == 0
    assert values[("cxr_images", (("status", "completed"),))] == 2
    assert values[("cxr_images", (("status", "failed"),))] == 1
    assert values[("cxr_images", (("status", "queued"),))] == 3
    assert values[("cxr_images", (("status", "running"),))] == 0
    assert values[("cxr_images_finished_last_minute", (("status", "completed"),))] == 2
    assert values[("cxr_images_finished_last_minute", (("status", "failed"),))] == 1
    assert values[("cxr_oldest_queued_seconds", ())] >= 0
    assert ("cxr_model_info", (("version", app.extensions["cxr"].model.version),)) in values
    assert values[("cxr_scrape_error", (("source", "redis"),))] == 0
    assert values[("cxr_scrape_error", (("source", "database"),))] == 0


def test_metrics_are_computed_at_each_scrape(app, client, db_sessions) -> None:
    web = app.test_client()
    before = samples(web.get("/metrics").get_data(as_text=True))
    assert before[("cxr_images", (("status", "queued"),))] == 0
    assert before[("cxr_oldest_queued_seconds", ())] == 0
    submit(client, png_files(3))
    after = samples(web.get("/metrics").get_data(as_text=True))
    assert after[("cxr_images", (("status", "queued"),))] == 3
    assert after[("cxr_queue_depth", (("queue", "cxr"),))] == 1


@pytest.mark.integration
def test_worker_serves_its_metrics(client, db_sessions, start_worker) -> None:
    port = free_port()
    start_worker(CXR_METRICS_PORT=str(port))
    job = submit(client, png_files(3))
    ids = [image["id"] for image in job["images"]]
    deadline = time.monotonic() + 180
    text = ""
    while time.monotonic() < deadline:
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        values = samples(text)
        if values.get(("cxr_worker_images_total", (("outcome", "completed"),)), 0) >= len(ids):
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"the worker's metrics never counted the job:\n{text}")
    assert values[("cxr_inference_batch_size_count", ())] == 1
    assert values[("cxr_inference_batch_size_sum", ())] == 3
    assert values[("cxr_chunk_seconds_count", ())] == 1
    assert values[("cxr_image_latency_seconds_count", ())] == 3
