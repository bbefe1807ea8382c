"""Celery tasks.  Arguments are ids only: no patient data travels through Redis."""

from __future__ import annotations

import logging
from functools import lru_cache

from celery import Task
from celery.utils.time import get_exponential_backoff_interval
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from shared.db import sessions_for
from shared.queue import CLASSIFY_TASK
from shared.settings import get_settings
from shared.storage import LocalBlobStore
from worker.celery_app import app
from worker.inference import get_classifier
from worker.processing import process_chunk, release

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


@lru_cache(maxsize=1)
def session_factory() -> sessionmaker[Session]:
    """One engine per process, created lazily (after any fork)."""
    return sessions_for(get_settings().sqlalchemy_url)


@lru_cache(maxsize=1)
def blob_store() -> LocalBlobStore:
    return LocalBlobStore(get_settings().blob_path)


@app.task(name=CLASSIFY_TASK, bind=True, acks_late=True, reject_on_worker_lost=True)
def classify_chunk(self: Task, chunk_id: str) -> None:
    settings = get_settings()
    try:
        outcome = process_chunk(chunk_id, session_factory(), blob_store(), get_classifier, settings)
    except (*TRANSIENT, DBAPIError) as exc:
        if not is_transient(exc):
            log.error("chunk %s: %s is not transient: not retried", chunk_id, type(exc).__name__)
            raise
        # Not an interruption: give the images back, then retry.  Once the retries are spent
        # the chunk's lease runs out and the sweeper sends it again.
        release(session_factory(), chunk_id)
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
