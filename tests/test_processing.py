"""Chunk processing and the sweeper, against real databases and a real Redis."""

from __future__ import annotations

import dataclasses
import datetime as dt

import cv2
import numpy as np
import pytest
import redis as redis_lib
from sqlalchemy import event, func, select

from shared.db import as_utc, utcnow
from shared.imaging import OutOfScopeError
from shared.model_store import Classifier
from shared.models import Chunk, ChunkStatus, Image, ImageStatus, Result
from shared.queue import QUEUE, make_celery
from shared.settings import DEFAULT_MODEL_PATH
from shared.storage import LocalBlobStore
from tests.factories import encode, make_job, png_bytes, truncated
from worker.processing import (
    TOO_MANY_ATTEMPTS,
    ChunkOutcome,
    _complete,
    _end_unscored,
    process_chunk,
)
from worker.sweeper import sweep


@pytest.fixture(scope="module")
def classifier() -> Classifier:
    return Classifier.load(DEFAULT_MODEL_PATH)


@pytest.fixture
def stack(settings, db_sessions, classifier):
    blobs = LocalBlobStore(settings.blob_path)

    def run(chunk_id: str):
        return process_chunk(chunk_id, db_sessions, blobs, lambda: classifier, settings)

    return db_sessions, blobs, run


class BatchSpy:
    """The classifier, recording the size of every batch it is asked to score."""

    def __init__(self, inner: Classifier) -> None:
        self.inner = inner
        self.batches: list[int] = []

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def predict(self, x, *args, **kwargs):
        self.batches.append(len(x))
        return self.inner.predict(x, *args, **kwargs)


@pytest.fixture
def spy(classifier) -> BatchSpy:
    return BatchSpy(classifier)


def statuses(sessions, image_ids):
    with sessions() as session:
        rows = session.execute(
            select(Image.id, Image.status, Image.error_code, Image.attempts).where(
                Image.id.in_(image_ids)
            )
        ).all()
    by_id = {r[0]: r[1:] for r in rows}
    return [by_id[i] for i in image_ids]


def result_count(sessions, image_ids) -> int:
    with sessions() as session:
        return session.scalar(
            select(func.count()).select_from(Result).where(Result.image_id.in_(image_ids))
        )


def test_processing_twice_changes_nothing(stack) -> None:
    sessions, blobs, run = stack
    _, (chunk_id,), image_ids = make_job(sessions, blobs, [png_bytes(n) for n in range(3)])
    first = run(chunk_id)
    assert (first.completed, first.failed) == (3, 0)
    with sessions() as session:
        before = {r.image_id: r.probability for r in session.scalars(select(Result))}
    second = run(chunk_id)
    assert (second.completed, second.failed) == (0, 0)
    assert result_count(sessions, image_ids) == 3
    with sessions() as session:
        after = {r.image_id: r.probability for r in session.scalars(select(Result))}
        assert session.get(Chunk, chunk_id).status == ChunkStatus.DONE
    assert before == after


def interrupted_chunk(sessions, blobs, states: list[ImageStatus]) -> tuple[str, list[str]]:
    """A chunk whose worker died: claimed once, so ``running``, its images in ``states`` (one
    ``running`` was being processed when it died; a ``completed`` one has its result)."""
    _, (chunk_id,), ids = make_job(
        sessions,
        blobs,
        [png_bytes(n) for n in range(len(states))],
        status=ChunkStatus.RUNNING,
        attempts=1,
    )
    with sessions.begin() as session:
        for image_id, state in zip(ids, states, strict=True):
            session.get(Image, image_id).status = state
            if state == ImageStatus.COMPLETED:
                session.add(
                    Result(image_id=image_id, probability=0.5, label="x", model_version="test")
                )
    return chunk_id, ids


def test_first_delivery_scores_the_chunk_in_one_batch(stack, settings, spy) -> None:
    """Counterpart of the test below: the spy sees a whole chunk go through in one batch."""
    sessions, blobs, _ = stack
    _, (chunk_id,), _ = make_job(sessions, blobs, [png_bytes(n) for n in range(4)])
    outcome = process_chunk(chunk_id, sessions, blobs, lambda: spy, settings)
    assert spy.batches == [4]
    assert outcome == ChunkOutcome(completed=4)


@pytest.mark.parametrize(
    ("states", "batches"),
    [
        ([ImageStatus.RUNNING] * 4, [1, 1, 1, 1]),
        (
            [ImageStatus.COMPLETED, ImageStatus.RUNNING, ImageStatus.QUEUED, ImageStatus.QUEUED],
            [1] * 3,
        ),
    ],
    ids=["died-mid-batch", "died-mid-image"],
)
def test_redelivered_chunk_is_processed_image_by_image(
    stack, settings, spy, states, batches
) -> None:
    """After an interruption every image still open is scored in a batch of its own (so one
    that kills its process spends only its own attempts); the one already done is not."""
    sessions, blobs, _ = stack
    chunk_id, ids = interrupted_chunk(sessions, blobs, states)
    outcome = process_chunk(chunk_id, sessions, blobs, lambda: spy, settings)
    assert spy.batches == batches
    assert outcome == ChunkOutcome(completed=len(batches))
    assert {s[0] for s in statuses(sessions, ids)} == {ImageStatus.COMPLETED}
    assert result_count(sessions, ids) == len(ids)


def test_redelivery_counts_an_interruption_only_for_the_running_image(stack) -> None:
    sessions, blobs, run = stack
    chunk_id, ids = interrupted_chunk(
        sessions,
        blobs,
        [ImageStatus.COMPLETED, ImageStatus.RUNNING, ImageStatus.QUEUED, ImageStatus.QUEUED],
    )
    run(chunk_id)
    assert [s[2] for s in statuses(sessions, ids)] == [0, 1, 0, 0]


def test_image_out_of_attempts_fails_and_the_rest_completes(stack, settings) -> None:
    sessions, blobs, run = stack
    _, (chunk_id,), ids = make_job(
        sessions, blobs, [png_bytes(n) for n in range(3)], status=ChunkStatus.RUNNING, attempts=2
    )
    with sessions.begin() as session:  # interrupted max_attempts - 1 times, and once more now
        poison = session.get(Image, ids[1])
        poison.status, poison.attempts = ImageStatus.RUNNING, settings.max_attempts - 1
    outcome = run(chunk_id)
    assert (outcome.completed, outcome.failed) == (2, 1)
    states = statuses(sessions, ids)
    assert states[1] == (ImageStatus.FAILED, TOO_MANY_ATTEMPTS, settings.max_attempts)
    assert states[0][0] == states[2][0] == ImageStatus.COMPLETED
    assert result_count(sessions, ids) == 2


def test_undecodable_image_fails_alone(stack) -> None:
    sessions, blobs, run = stack
    _, (chunk_id,), ids = make_job(sessions, blobs, [png_bytes(1), truncated(png_bytes(2))])
    outcome = run(chunk_id)
    assert (outcome.completed, outcome.failed) == (1, 1)
    assert statuses(sessions, ids)[1][:2] == (ImageStatus.FAILED, "truncated_image")


def one_lung_field(seed: int) -> bytes:
    """A film with a single dark field in the middle, as a lateral view shows."""
    rng = np.random.default_rng(seed)
    img = np.full((300, 256), 180, np.float32)
    cv2.ellipse(img, (128, 150), (60, 100), 0, 0, 360, 70.0, -1)
    img += rng.normal(0, 20, img.shape)
    return encode(np.clip(img, 0, 255).astype(np.uint8))


def test_out_of_scope_image_is_skipped_with_no_result(stack) -> None:
    sessions, blobs, run = stack
    _, (chunk_id,), ids = make_job(sessions, blobs, [png_bytes(1), one_lung_field(7), png_bytes(2)])
    outcome = run(chunk_id)
    assert outcome == ChunkOutcome(completed=2, out_of_scope=1)
    states = statuses(sessions, ids)
    assert states[1][:2] == (ImageStatus.SKIPPED, "not_frontal_chest_xray")
    assert states[0][0] == states[2][0] == ImageStatus.COMPLETED
    assert result_count(sessions, [ids[1]]) == 0
    assert result_count(sessions, [ids[0], ids[2]]) == 2
    with sessions() as session:
        skipped = session.get(Image, ids[1])
        assert skipped.error_message.startswith("not a frontal chest radiograph")
        assert skipped.finished_at is not None
        assert session.get(Chunk, chunk_id).status == ChunkStatus.DONE


def test_redelivery_of_a_chunk_with_a_skipped_image_changes_nothing(stack) -> None:
    sessions, blobs, run = stack
    _, (chunk_id,), ids = make_job(sessions, blobs, [png_bytes(1), one_lung_field(7)])
    run(chunk_id)
    states = statuses(sessions, ids)
    assert run(chunk_id) == ChunkOutcome()
    assert statuses(sessions, ids) == states
    assert result_count(sessions, ids) == 1


def test_a_stale_execution_cannot_change_a_finished_image(stack, classifier) -> None:
    """One that scored the images with another model, or judged their scope differently, and
    comes to write after this chunk finished."""
    sessions, blobs, run = stack
    _, (chunk_id,), ids = make_job(sessions, blobs, [png_bytes(1), one_lung_field(7)])
    run(chunk_id)
    states = statuses(sessions, ids)
    with sessions() as session:
        before = {r.image_id: r.probability for r in session.scalars(select(Result))}
    with sessions.begin() as session:
        assert _complete(session, classifier, [(ids[1], 0.9)]) == ([], [])
        assert not _end_unscored(
            session, [ids[0]], ImageStatus.SKIPPED, OutOfScopeError.code, "stale"
        )
    assert statuses(sessions, ids) == states
    with sessions() as session:
        assert {r.image_id: r.probability for r in session.scalars(select(Result))} == before


def test_out_of_scope_image_is_skipped_also_image_by_image(stack, settings, classifier) -> None:
    """After an interruption the chunk goes image by image; the skip is recorded the same way."""
    sessions, blobs, _ = stack
    _, (chunk_id,), ids = make_job(
        sessions, blobs, [one_lung_field(3), png_bytes(4)], status=ChunkStatus.RUNNING, attempts=1
    )
    with sessions.begin() as session:
        for image in session.scalars(select(Image).where(Image.id.in_(ids))):
            image.status, image.attempts = ImageStatus.RUNNING, 1
    outcome = process_chunk(chunk_id, sessions, blobs, lambda: classifier, settings)
    assert outcome == ChunkOutcome(completed=1, out_of_scope=1)
    assert statuses(sessions, ids) == [
        (ImageStatus.SKIPPED, "not_frontal_chest_xray", 2),
        (ImageStatus.COMPLETED, None, 2),
    ]
    assert result_count(sessions, ids) == 1


def queue_length(redis_url: str) -> int:
    return redis_lib.Redis.from_url(redis_url).llen(QUEUE)


def test_sweeper_enqueues_chunks_whose_send_failed(stack, settings, redis_url) -> None:
    """Undispatched chunks are the dispatcher's: the sweeper dispatches them in their turn
    (oldest job first), up to CXR_DISPATCH_DEPTH waiting messages."""
    sessions, blobs, _ = stack
    settings = dataclasses.replace(settings, dispatch_depth=1)
    old = utcnow() - dt.timedelta(seconds=settings.enqueue_grace_seconds + 5)
    _, (stranded,), _ = make_job(sessions, blobs, [png_bytes(1)], created_at=old)
    _, (fresh,), _ = make_job(sessions, blobs, [png_bytes(2)])  # the newer job: not yet
    assert sweep(make_celery(settings), sessions, settings) == 1
    assert queue_length(redis_url) == 1
    with sessions() as session:
        assert session.get(Chunk, stranded).enqueued_at is not None
        assert session.get(Chunk, fresh).enqueued_at is None


def test_sweeper_takes_over_expired_leases(stack, settings, redis_url) -> None:
    sessions, blobs, _ = stack
    past, future = utcnow() - dt.timedelta(seconds=1), utcnow() + dt.timedelta(seconds=600)
    _, (dead,), _ = make_job(
        sessions,
        blobs,
        [png_bytes(1)],
        status=ChunkStatus.RUNNING,
        enqueued_at=past,
        lease_expires_at=past,
        attempts=1,
    )
    _, (alive,), _ = make_job(
        sessions,
        blobs,
        [png_bytes(2)],
        status=ChunkStatus.RUNNING,
        enqueued_at=past,
        lease_expires_at=future,
        attempts=1,
    )
    assert sweep(make_celery(settings), sessions, settings) == 1
    with sessions() as session:
        assert session.get(Chunk, dead).status == ChunkStatus.QUEUED
        assert session.get(Chunk, alive).status == ChunkStatus.RUNNING


def test_sweeper_recovers_messages_lost_with_redis_only_when_the_queue_is_idle(
    stack, settings, redis_url
) -> None:
    sessions, blobs, _ = stack
    old = utcnow() - dt.timedelta(seconds=settings.enqueue_grace_seconds + 5)
    make_job(sessions, blobs, [png_bytes(1)], created_at=old, enqueued_at=old)
    client = redis_lib.Redis.from_url(redis_url)
    client.lpush(QUEUE, b"someone else's message")  # queue busy: the chunk may be waiting
    assert sweep(make_celery(settings), sessions, settings) == 0
    client.delete(QUEUE)  # Redis lost everything
    assert sweep(make_celery(settings), sessions, settings) == 1
    assert queue_length(redis_url) == 1


def test_sweeper_resends_at_once_what_a_wiped_broker_lost_even_while_it_is_busy(
    stack, settings, redis_url
) -> None:
    """Redis restarted without persistence under load: the busy queue hides the loss from the
    idle rule, the lost key does not."""
    from worker.sweeper import BrokerEpoch

    sessions, blobs, _ = stack
    celery, epoch = make_celery(settings), BrokerEpoch()
    old = utcnow() - dt.timedelta(seconds=settings.enqueue_grace_seconds + 5)
    _, (lost,), _ = make_job(sessions, blobs, [png_bytes(1)], created_at=old, enqueued_at=old)
    client = redis_lib.Redis.from_url(redis_url)
    client.lpush(QUEUE, b"the chunk's message")
    assert sweep(celery, sessions, settings, epoch) == 0  # busy, not wiped: it may be waiting
    client.flushall()  # Redis lost everything ...
    client.lpush(QUEUE, b"new work since")  # ... and is busy again at once
    assert sweep(celery, sessions, settings) == 0  # without the epoch: nothing to tell
    assert sweep(celery, sessions, settings, epoch) == 1
    with sessions() as session:
        assert as_utc(session.get(Chunk, lost).enqueued_at) > old
    assert sweep(celery, sessions, settings, epoch) == 0  # once


def test_two_executions_of_one_chunk_at_once_store_each_result_once(
    stack, settings, classifier
) -> None:
    """B claims the chunk while A holds it (a redelivery racing a slow worker): B finishes
    everything, A finds nothing left to write; one result per image, chunk done."""
    sessions, blobs, run = stack
    _, (chunk_id,), ids = make_job(sessions, blobs, [png_bytes(n) for n in range(4)])
    inner: list = []

    def classifier_with_a_race():  # called by A after its claim, before it classifies
        if not inner:
            inner.append(run(chunk_id))  # B, start to finish
        return classifier

    a = process_chunk(chunk_id, sessions, blobs, classifier_with_a_race, settings)
    b = inner[0]
    assert b.completed == 4
    assert a.completed == 0
    assert result_count(sessions, ids) == 4
    assert {s[0] for s in statuses(sessions, ids)} == {ImageStatus.COMPLETED}
    with sessions() as session:
        assert session.get(Chunk, chunk_id).status == ChunkStatus.DONE


class FlakyBlobs:
    """A blob store whose reads fail (as a network volume might) until ``heal()``."""

    def __init__(self, inner) -> None:
        self.inner, self.broken = inner, True

    def put(self, data: bytes) -> str:
        return self.inner.put(data)

    def get(self, key: str) -> bytes:
        if self.broken:
            raise OSError("storage unavailable")
        return self.inner.get(key)


def test_transient_error_is_not_counted_as_an_interruption(stack, settings, classifier) -> None:
    from worker.processing import release

    sessions, blobs, _ = stack
    _, (chunk_id,), ids = make_job(sessions, blobs, [png_bytes(n) for n in range(3)])
    flaky = FlakyBlobs(blobs)
    for _ in range(settings.max_attempts + 1):  # more failures than attempts allowed
        with pytest.raises(OSError, match="storage unavailable"):
            process_chunk(chunk_id, sessions, flaky, lambda: classifier, settings)
        release(sessions, chunk_id)
        assert {s[0] for s in statuses(sessions, ids)} == {ImageStatus.QUEUED}
    flaky.broken = False
    outcome = process_chunk(chunk_id, sessions, flaky, lambda: classifier, settings)
    assert outcome.completed == 3
    assert [s[2] for s in statuses(sessions, ids)] == [0, 0, 0]


def test_chunk_done_only_when_all_its_images_are(stack) -> None:
    from worker.processing import _finish

    sessions, blobs, _ = stack
    _, (chunk_id,), ids = make_job(
        sessions, blobs, [png_bytes(1), png_bytes(2)], status=ChunkStatus.RUNNING
    )
    with sessions.begin() as session:
        session.get(Image, ids[0]).status = ImageStatus.COMPLETED
        assert not _finish(session, chunk_id)
        session.get(Image, ids[1]).status = ImageStatus.FAILED
        assert _finish(session, chunk_id)


def test_sweeper_resends_chunks_queued_longer_than_the_visibility_timeout(
    stack, settings, redis_url
) -> None:
    sessions, blobs, _ = stack
    long_ago = utcnow() - dt.timedelta(seconds=settings.visibility_timeout + 5)
    _, (lost,), _ = make_job(
        sessions, blobs, [png_bytes(1)], created_at=long_ago, enqueued_at=long_ago
    )
    redis_lib.Redis.from_url(redis_url).lpush(QUEUE, b"a busy queue")
    assert sweep(make_celery(settings), sessions, settings) == 1
    with sessions() as session:
        assert as_utc(session.get(Chunk, lost).enqueued_at) > long_ago


def test_a_chunk_costs_the_same_database_statements_whatever_its_size(stack, settings) -> None:
    """Bulk writes: a chunk of 8 films takes no more statements than a chunk of 2."""
    sessions, blobs, run = stack
    engine = sessions.kw["bind"]
    counts = []
    for n in (2, 8):
        _, (chunk_id,), ids = make_job(sessions, blobs, [png_bytes(k) for k in range(n)])
        statements: list[str] = []

        def count(conn, cursor, statement, *args, seen=statements):
            seen.append(statement)

        event.listen(engine, "before_cursor_execute", count)
        try:
            assert run(chunk_id).completed == n
        finally:
            event.remove(engine, "before_cursor_execute", count)
        assert result_count(sessions, ids) == n
        counts.append(len(statements))
    assert counts[1] == counts[0], counts
