"""Celery tasks.  Arguments are ids only: no patient data travels through Redis."""

from __future__ import annotations

import logging

from celery import Task
from celery.utils.time import get_exponential_backoff_interval
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from shared.queue import CLASSIFY_TASK
from shared.settings import get_settings
from worker.celery_app import app
from worker.processing import process_chunk, release
from worker.resources import blobs, classifier, sessions

log = logging.getLogger(__name__)

#: Transient failures (database, storage): the chunk is retried with exponential backoff.
TRANSIENT = (OperationalError, InterfaceError, OSError)


def is_transient(exc: BaseException) -> bool:
    """Connection-level database errors and storage I/O: worth a retry.  Integrity and
    programming errors are bugs: retrying them dozens of times would only hide them."""
    if isinstance(exc, TRANSIENT):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


MAX_RETRIES = 8


# acks_late and reject_on_worker_lost come from the app's config (shared/queue.py)
@app.task(name=CLASSIFY_TASK, bind=True)
def classify_chunk(self: Task, chunk_id: str) -> None:
    settings = get_settings()
    try:
        outcome = process_chunk(chunk_id, sessions(), blobs(), classifier, settings)
    except (*TRANSIENT, DBAPIError) as exc:
        if not is_transient(exc):
            log.error("chunk %s: %s is not transient: not retried", chunk_id, type(exc).__name__)
            raise
        # Not an interruption: give the images back, then retry.  Once the retries are spent
        # the chunk's lease runs out and the sweeper sends it again.
        release(sessions(), chunk_id)
        log.warning(
            "chunk %s: transient %s, retry %d", chunk_id, type(exc).__name__, self.request.retries
        )
        raise self.retry(
            exc=exc,
            countdown=get_exponential_backoff_interval(
                factor=1,
                retries=self.request.retries,
                maximum=settings.retry_backoff_max,
                full_jitter=True,
            ),
            max_retries=MAX_RETRIES,
        ) from exc
    log.info(
        "chunk %s: %d completed, %d failed, %d skipped (out of scope), %d already done",
        chunk_id,
        outcome.completed,
        outcome.failed,
        outcome.out_of_scope,
        outcome.already_done,
    )
