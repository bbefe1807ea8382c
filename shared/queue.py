"""The Celery application's configuration and the one way work is enqueued.

API and workers build the same Celery app from the settings; the API only *sends* tasks by
name and never imports the worker's task code (or TensorFlow).  Job state lives in our own
tables, so there is no result backend.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from celery import Celery
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from shared.db import utcnow
from shared.models import Chunk, ChunkStatus
from shared.settings import Settings

log = logging.getLogger(__name__)

CLASSIFY_TASK = "cxr.classify_chunk"
QUEUE = "cxr"
#: Work with the PACS (reports sent back, pulls of studies) goes through a queue of its own, so
#: that a slow or unreachable PACS never holds classification back (every worker consumes it
#: too: worker/celery_app.py).
DELIVER_TASK = "cxr.deliver_report"
PULL_TASK = "cxr.pull_job"
PACS_QUEUE = "cxr-pacs"


def make_celery(settings: Settings, name: str = "cxr") -> Celery:
    app = Celery(name, broker=settings.redis_url)
    app.conf.update(
        task_default_queue=QUEUE,
        task_routes={DELIVER_TASK: {"queue": PACS_QUEUE}, PULL_TASK: {"queue": PACS_QUEUE}},
        task_ignore_result=True,
        result_backend=None,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        # a pool child loads TensorFlow and the model before it reports up: allow for that
        worker_proc_alive_timeout=120,
        task_time_limit=settings.task_time_limit,
        task_soft_time_limit=max(settings.task_time_limit - 30, settings.task_time_limit // 2),
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout,
            # an unreachable Redis must fail an enqueue in seconds, not hang the request
            "socket_connect_timeout": 5,
            "socket_timeout": 30,
        },
        broker_connection_retry_on_startup=True,
        task_serializer="json",
        accept_content=["json"],
    )
    return app


def enqueue_chunks(
    celery: Celery, session_factory: sessionmaker[Session], chunk_ids: Iterable[str]
) -> int:
    """Send one task per chunk, *after* the chunks were committed, and stamp ``enqueued_at``.

    A chunk whose send fails keeps ``enqueued_at`` NULL; the sweeper re-enqueues it.  Returns
    the number of chunks sent.
    """
    sent: list[str] = []
    try:
        for chunk_id in chunk_ids:
            celery.send_task(CLASSIFY_TASK, args=[chunk_id], queue=QUEUE)
            sent.append(chunk_id)
    except Exception as exc:  # broker down: the rows are safe, the sweeper will send them
        log.warning(
            "enqueue failed after %d chunks (%s); the sweeper will retry",
            len(sent),
            type(exc).__name__,
        )
    if sent:
        try:
            with session_factory.begin() as session:
                session.execute(
                    update(Chunk)
                    .where(Chunk.id.in_(sent), Chunk.status == ChunkStatus.QUEUED)
                    .values(enqueued_at=utcnow())
                )
        except Exception as exc:  # the tasks are out; at worst the sweeper sends one again
            log.warning("could not stamp enqueued_at (%s)", type(exc).__name__)
    return len(sent)


def enqueue_deliveries(celery: Celery, image_ids: Iterable[str]) -> int:
    """Send one report-delivery task per image, *after* their ``pending`` was committed.

    A send that fails leaves the image pending with no attempt: the sweeper sends it after its
    grace period.  Returns the number sent.
    """
    sent = 0
    try:
        for image_id in image_ids:
            celery.send_task(DELIVER_TASK, args=[image_id], queue=PACS_QUEUE)
            sent += 1
    except Exception as exc:  # broker down: the rows are safe, the sweeper will send them
        log.warning(
            "enqueue of reports failed after %d (%s); the sweeper will retry",
            sent,
            type(exc).__name__,
        )
    return sent


def enqueue_pull(celery: Celery, job_id: str) -> bool:
    """Send a pull job's task, after its row was committed; False when the broker is away
    (the sweeper sends it again: a pending pull without progress is re-enqueued)."""
    try:
        celery.send_task(PULL_TASK, args=[job_id], queue=PACS_QUEUE)
    except Exception as exc:
        log.warning("enqueue of pull job %s failed (%s)", job_id, type(exc).__name__)
        return False
    return True
