"""Fair dispatch (shared/dispatch.py): one client's backlog cannot starve another's job.

The picking order is checked against a real database, the dispatcher against real Redis (the
broker's list holds only CXR_DISPATCH_DEPTH waiting messages, sent in turn), and the whole way
with a real worker process: a small job sent behind a large one finishes while most of the
large one is still queued.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import time

import pytest
import redis as redis_lib
from sqlalchemy import select

from shared.dispatch import dispatch, pick_chunks, undispatched
from shared.models import Chunk, Image, ImageStatus, Job
from shared.queue import QUEUE, make_celery
from shared.storage import blob_store
from tests.factories import make_job, make_key, png_bytes, png_files, submit, with_key


@pytest.fixture
def blobs(settings):
    return blob_store(settings)


def job_for(db_sessions, blobs, client: str, chunks: int, priority: int = 0) -> list[str]:
    """A job of ``client`` with ``chunks`` chunks of one image; returns its chunk ids."""
    images = [png_bytes(n) for n in range(chunks)]
    fields = {"client": client, "priority": priority}
    return make_job(db_sessions, blobs, images, chunk_size=1, job_fields=fields)[1]


def test_picks_round_robin_across_clients_oldest_job_first(db_sessions, blobs) -> None:
    a_first = job_for(db_sessions, blobs, "A", 3)
    a_second = job_for(db_sessions, blobs, "A", 1)
    b = job_for(db_sessions, blobs, "B", 2)
    (c,) = job_for(db_sessions, blobs, "C", 1)
    # A was served last, B before it, C never: C, B, A, then round after round
    with db_sessions() as session:
        picks = pick_chunks(session, 10, {"A": 5, "B": 3})
        first_two = pick_chunks(session, 2, {"A": 5, "B": 3})
    assert [p.client for p in picks] == ["C", "B", "A", "B", "A", "A", "A"]
    assert picks[0].chunk_id == c
    assert {picks[1].chunk_id, picks[3].chunk_id} == set(b)
    assert {picks[2].chunk_id, picks[4].chunk_id, picks[5].chunk_id} == set(a_first)
    assert picks[6].chunk_id == a_second[0]  # A's older job first, all of it
    assert [p.client for p in first_two] == ["C", "B"]


def test_picks_higher_priority_first_whatever_the_turns(db_sessions, blobs) -> None:
    job_for(db_sessions, blobs, "bulk", 3)
    urgent = job_for(db_sessions, blobs, "ed", 2, priority=5)
    with db_sessions() as session:
        picks = pick_chunks(session, 3, {"ed": 100})  # ed was served most recently
    assert {p.chunk_id for p in picks[:2]} == set(urgent)
    assert [p.client for p in picks] == ["ed", "ed", "bulk"]


def queued_chunk_ids(redis_url: str) -> list[str]:
    """The chunk ids of the messages waiting in the broker's list, oldest first."""
    raw = redis_lib.Redis.from_url(redis_url).lrange(QUEUE, 0, -1)
    bodies = [json.loads(base64.b64decode(json.loads(m)["body"])) for m in reversed(raw)]
    return [body[0][0] for body in bodies]


def test_dispatch_keeps_the_broker_shallow_and_serves_clients_in_turn(
    db_sessions, blobs, settings, redis_url
) -> None:
    settings = dataclasses.replace(settings, dispatch_depth=2)
    celery = make_celery(settings)
    a = job_for(db_sessions, blobs, "A", 4)  # the older job: A goes first
    b = job_for(db_sessions, blobs, "B", 2)
    rounds = []
    for _ in range(3):
        assert dispatch(celery, db_sessions, settings) == 2
        assert dispatch(celery, db_sessions, settings) == 0  # full: nothing more is sent
        rounds.append(queued_chunk_ids(redis_url))
        redis_lib.Redis.from_url(redis_url).delete(QUEUE)  # as workers taking them would
    assert rounds == [[a[0], b[0]], [a[1], b[1]], [a[2], a[3]]]
    with db_sessions() as session:
        stamped = session.scalars(select(Chunk.enqueued_at)).all()
        assert all(stamped)
        assert undispatched(session) == (0, 0)


def test_undispatched_chunks_count_in_the_metrics_queue_depth(app, client, db_sessions) -> None:
    from tests.test_metrics_endpoint import samples

    submit(client, png_files(12))  # chunks of 4: one dispatched (depth 1), two waiting
    with db_sessions() as session:
        assert undispatched(session) == (2, 8)
    values = samples(app.test_client().get("/metrics").get_data(as_text=True))
    assert values[("cxr_undispatched_chunks", ())] == 2
    assert values[("cxr_undispatched_images", ())] == 8
    assert values[("cxr_queue_depth", (("queue", "cxr"),))] == 3


def unfinished(db_sessions, job_id: str) -> int:
    with db_sessions() as session:
        return len(
            session.scalars(
                select(Image.id).where(
                    Image.job_id == job_id,
                    Image.status.in_((ImageStatus.QUEUED, ImageStatus.RUNNING)),
                )
            ).all()
        )


@pytest.mark.integration
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_small_job_finishes_while_a_large_one_is_mostly_queued(
    app, db_sessions, start_worker
) -> None:
    """A: 200 images in chunks of 4 (50 chunks), sent first; B: 8 images, sent just after.
    One worker.  B must end while most of A is still waiting."""
    start_worker()
    a = with_key(app.test_client(), make_key(db_sessions, "big-hospital"))
    b = with_key(app.test_client(), make_key(db_sessions, "small-clinic"))
    job_a = submit(a, png_files(200))["id"]
    job_b = submit(b, png_files(8, seed=1000))["id"]
    deadline = time.monotonic() + 120
    while unfinished(db_sessions, job_b) and time.monotonic() < deadline:
        time.sleep(0.05)
    left_of_a = unfinished(db_sessions, job_a)
    assert unfinished(db_sessions, job_b) == 0, "B did not finish in time"
    assert left_of_a > 150, f"B finished only when A had {left_of_a} of 200 images left"
    with db_sessions() as session:
        b_chunks = session.scalars(select(Chunk.id).where(Chunk.job_id == job_b)).all()
        assert len(b_chunks) == 2
        assert session.scalar(select(Job.client).where(Job.id == job_b)) == "small-clinic"
