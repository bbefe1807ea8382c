"""Celery tasks.  Arguments are ids only: no patient data travels through Redis."""

from __future__ import annotations

import logging
import random
from functools import lru_cache

from celery import Task
from sqlalchemy.exc import DBAPIError, OperationalError
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
TRANSIENT = (OperationalError, DBAPIError, OSError)
MAX_RETRIES = 8


@lru_cache(maxsize=1)
def session_factory() -> sessionmaker[Session]:
    """One engine per process, created lazily (after any fork)."""
    return sessions_for(get_settings().sqlalchemy_url)


@lru_cache(maxsize=1)
def blob_store() -> LocalBlobStore:
    return LocalBlobStore(get_settings().blob_path)


def backoff(retries: int, cap: int) -> float:
    """Exponential backoff with jitter: about 1, 2, 4, ... seconds, at most ``cap``."""
    return min(cap, 2**retries) * random.uniform(0.5, 1.0)


@app.task(name=CLASSIFY_TASK, bind=True, acks_late=True, reject_on_worker_lost=True)
def classify_chunk(self: Task, chunk_id: str) -> None:
    settings = get_settings()
    try:
        outcome = process_chunk(chunk_id, session_factory(), blob_store(), get_classifier, settings)
    except TRANSIENT as exc:
        # Not an interruption: give the images back, then retry.  Once the retries are spent
        # the chunk's lease runs out and the sweeper sends it again.
        release(session_factory(), chunk_id)
        log.warning(
            "chunk %s: transient %s, retry %d", chunk_id, type(exc).__name__, self.request.retries
        )
        raise self.retry(
            exc=exc,
            countdown=backoff(self.request.retries, settings.retry_backoff_max),
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
