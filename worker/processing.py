"""Processing one chunk: claim it, decode its images, classify them in one batch, store.

Idempotent by construction: images already terminal are skipped, results are upserted keyed by
image id, and the chunk is marked done in the same transaction as its results.  On a
redelivery (the chunk was claimed before, so a worker may have died on one of its images) the
images are processed one at a time, each attempt committed first, so an image that kills its
process only spends its own attempts and ends ``failed`` after ``max_attempts``.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from shared.db import insert_for, utcnow
from shared.imaging import ImageError, preprocess
from shared.model_store import Classifier
from shared.models import Chunk, ChunkStatus, Image, ImageStatus, Result
from shared.settings import Settings
from shared.storage import BlobNotFoundError, BlobStore

log = logging.getLogger(__name__)

TOO_MANY_ATTEMPTS = "too_many_attempts"


@dataclass
class ChunkOutcome:
    completed: int = 0
    failed: int = 0
    skipped: int = 0


def _fail(session: Session, image_id: str, code: str, message: str) -> None:
    session.execute(
        update(Image)
        .where(Image.id == image_id, Image.status.not_in(ImageStatus.TERMINAL))
        .values(
            status=ImageStatus.FAILED,
            error_code=code,
            error_message=message[:500],
            finished_at=utcnow(),
        )
    )


def _store_results(
    session: Session, classifier: Classifier, ids: list[str], probs: np.ndarray
) -> None:
    now = utcnow()
    info = classifier.info
    for image_id, prob in zip(ids, probs, strict=True):
        p = float(prob)
        stmt = insert_for(session, Result.__table__).values(
            image_id=image_id,
            probability=p,
            label=info.label(p),
            model_version=info.version,
            created_at=now,
        )
        session.execute(
            stmt.on_conflict_do_update(
                index_elements=["image_id"],
                set_={
                    "probability": p,
                    "label": info.label(p),
                    "model_version": info.version,
                    "created_at": now,
                },
            )
        )
        session.execute(
            update(Image)
            .where(Image.id == image_id)
            .values(
                status=ImageStatus.COMPLETED, error_code=None, error_message=None, finished_at=now
            )
        )


def _claim(session: Session, chunk_id: str, settings: Settings) -> tuple[Chunk, list[Image]] | None:
    chunk = session.get(Chunk, chunk_id)
    if chunk is None or chunk.status == ChunkStatus.DONE:
        return None
    now = utcnow()
    chunk.status = ChunkStatus.RUNNING
    chunk.attempts += 1
    chunk.started_at = now
    chunk.lease_expires_at = now + dt.timedelta(seconds=settings.lease_seconds)
    images = list(
        session.scalars(
            select(Image)
            .where(Image.chunk_id == chunk_id, Image.status.not_in(ImageStatus.TERMINAL))
            .order_by(Image.position)
        )
    )
    return chunk, images


def _begin_attempt(session: Session, images: list[Image], settings: Settings) -> list[Image]:
    """Count an attempt on each image; those out of attempts end failed. Returns the rest."""
    live = []
    now = utcnow()
    for image in images:
        if image.attempts >= settings.max_attempts:
            image.status = ImageStatus.FAILED
            image.error_code = TOO_MANY_ATTEMPTS
            image.error_message = (
                f"processing was interrupted {image.attempts} times "
                "(the worker died or timed out on this image)"
            )
            image.finished_at = now
            continue
        image.attempts += 1
        image.status = ImageStatus.RUNNING
        image.started_at = now
        live.append(image)
    return live


def _decode(
    blobs: BlobStore, image: Image, classifier: Classifier, settings: Settings
) -> np.ndarray | ImageError:
    try:
        data = blobs.get(image.blob_key)
    except BlobNotFoundError:
        return ImageError("the stored image is missing")  # code: invalid_image
    try:
        return preprocess(data, classifier.info.preprocess, settings.max_image_pixels)
    except ImageError as exc:
        return exc


def _classify(
    session: Session,
    images: list[Image],
    blobs: BlobStore,
    classifier: Classifier,
    settings: Settings,
    outcome: ChunkOutcome,
) -> None:
    arrays: list[np.ndarray] = []
    ids: list[str] = []
    for image in images:
        decoded = _decode(blobs, image, classifier, settings)
        if isinstance(decoded, ImageError):
            _fail(session, image.id, decoded.code, decoded.message)
            outcome.failed += 1
        else:
            arrays.append(decoded)
            ids.append(image.id)
    if ids:
        probs = classifier.predict(np.stack(arrays))
        _store_results(session, classifier, ids, probs)
        outcome.completed += len(ids)


def process_chunk(
    chunk_id: str,
    session_factory: sessionmaker[Session],
    blobs: BlobStore,
    get_classifier: Callable[[], Classifier],
    settings: Settings,
) -> ChunkOutcome:
    """Classify every non-terminal image of a chunk; safe to run any number of times."""
    outcome = ChunkOutcome()
    with session_factory.begin() as session:
        claimed = _claim(session, chunk_id, settings)
        if claimed is None:
            log.info("chunk %s already done or gone; nothing to do", chunk_id)
            return outcome
        chunk, images = claimed
        redelivered = chunk.attempts > 1
        if redelivered:
            pending_ids = [i.id for i in images]
        else:
            live = _begin_attempt(session, images, settings)
            outcome.failed += len(images) - len(live)
            pending_ids = [i.id for i in live]
    classifier = get_classifier()
    if not redelivered:
        with session_factory.begin() as session:
            live = list(session.scalars(select(Image).where(Image.id.in_(pending_ids))))
            live.sort(key=lambda i: i.position)
            _classify(session, live, blobs, classifier, settings, outcome)
            _finish(session, chunk_id)
        return outcome
    # Redelivery: a worker may have died on one of these images. Give every image its own
    # attempt, committed before it is decoded, and its own transaction.
    log.info("chunk %s redelivered (attempt %d): isolating its images", chunk_id, chunk.attempts)
    for image_id in pending_ids:
        with session_factory.begin() as session:
            image = session.get(Image, image_id)
            if image is None or image.status in ImageStatus.TERMINAL:
                outcome.skipped += 1
                continue
            if not _begin_attempt(session, [image], settings):
                outcome.failed += 1
                continue
        with session_factory.begin() as session:
            image = session.get(Image, image_id)
            if image is not None and image.status not in ImageStatus.TERMINAL:
                _classify(session, [image], blobs, classifier, settings, outcome)
    with session_factory.begin() as session:
        _finish(session, chunk_id)
    return outcome


def _finish(session: Session, chunk_id: str) -> None:
    session.execute(
        update(Chunk)
        .where(Chunk.id == chunk_id)
        .values(status=ChunkStatus.DONE, finished_at=utcnow(), lease_expires_at=None)
    )
