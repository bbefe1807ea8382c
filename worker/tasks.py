"""Celery tasks.  Arguments are ids only: no patient data travels through Redis."""

from __future__ import annotations

import logging
from functools import lru_cache

from celery import Task
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from shared.db import make_engine, make_session_factory
from shared.queue import CLASSIFY_TASK
from shared.settings import get_settings
from shared.storage import BlobCorruptError, LocalBlobStore
from worker.celery_app import app
from worker.inference import get_classifier
from worker.processing import process_chunk

log = logging.getLogger(__name__)

#: Transient failures: the chunk is retried with exponential backoff.
TRANSIENT = (OperationalError, DBAPIError, BlobCorruptError, OSError)


@lru_cache(maxsize=1)
def session_factory() -> sessionmaker[Session]:
    """One engine per process, created lazily (after any fork)."""
    return make_session_factory(make_engine(get_settings().sqlalchemy_url))


@lru_cache(maxsize=1)
def blob_store() -> LocalBlobStore:
    return LocalBlobStore(get_settings().blob_path)


@app.task(
    name=CLASSIFY_TASK,
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    autoretry_for=TRANSIENT,
    retry_backoff=2,
    retry_backoff_max=60,
    retry_jitter=True,
    max_retries=8,  # ~5 minutes of backoff; after that the sweeper's lease takes over
)
def classify_chunk(self: Task, chunk_id: str) -> None:
    settings = get_settings()
    outcome = process_chunk(chunk_id, session_factory(), blob_store(), get_classifier, settings)
    log.info(
        "chunk %s: %d completed, %d failed, %d skipped",
        chunk_id,
        outcome.completed,
        outcome.failed,
        outcome.skipped,
    )
