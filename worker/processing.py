"""Processing one chunk: claim it, decode its images, classify them in one batch, store.

Every state change is a conditional UPDATE on the row's current status, so two executions of
the same chunk (a redelivery racing a slow worker) cannot undo each other's work:

* an image becomes ``completed`` only from a non-terminal status, and its result row is upserted
  in the same transaction, only when that transition happened: exactly one result per image;
* an image becomes ``failed`` only from a non-terminal status, and ``skipped`` likewise (a readable
  image the model's lung-field step finds out of scope, :class:`OutOfScopeError`: it gets an
  error code and message, never a probability and never a result row);
* a chunk becomes ``done`` only when none of its images is still non-terminal;
* a DICOM image (one with a ``sop_instance_uid``) that becomes ``completed`` while a PACS is
  configured gets ``pacs_delivery='pending'`` in that same UPDATE; the ids are handed to
  ``send_reports`` (which enqueues their deliveries) only after the transaction committed (a
  crash in between leaves them pending, and the sweeper sends them).

``attempts`` counts *interrupted* attempts: an image found ``running`` when a chunk is claimed
was being processed by an execution that never finished (its worker died or timed out).  After
such an interruption the chunk is processed image by image, each marked ``running`` in its own
commit before it is decoded, so an image that kills its process only spends its own attempts and
ends ``failed`` (``too_many_attempts``) after ``max_attempts``.  A transient error (database,
storage) is not an interruption: the images are released back to ``queued`` before the retry.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from sqlalchemy import case, exists, select, update
from sqlalchemy.orm import Session, sessionmaker

from shared.db import insert_for, utcnow
from shared.imaging import ImageError, OutOfScopeError, preprocess_many
from shared.model_store import Classifier
from shared.models import (
    TERMINAL_IMAGE,
    Chunk,
    ChunkStatus,
    Image,
    ImageStatus,
    PacsDelivery,
    Result,
)
from shared.settings import Settings, available_cores
from shared.storage import BlobCorruptError, BlobNotFoundError, BlobStore

log = logging.getLogger(__name__)

TOO_MANY_ATTEMPTS = "too_many_attempts"
NOT_TERMINAL = Image.status.not_in(TERMINAL_IMAGE)
#: A chunk claimed this many times (redeliveries and retries together) gives up on the images
#: it still holds: a safety net against a fault that is neither transient nor a crash.
MAX_CHUNK_CLAIMS = 30
#: A report is owed to the PACS for a completed image that came from a DICOM file.
OWES_REPORT = case((Image.sop_instance_uid.is_not(None), PacsDelivery.PENDING.value), else_=None)

#: Sends one report-delivery task per image id (called after the commit that made them pending).
ReportSender = Callable[[Sequence[str]], object]


@dataclass
class ChunkOutcome:
    """What this execution changed: images it completed, failed and skipped (out of scope), and
    the ones it found already terminal (another execution got there first: nothing done)."""

    completed: int = 0
    failed: int = 0
    out_of_scope: int = 0
    already_done: int = 0
    reports_pending: int = 0  # completed DICOM images whose report is owed to the PACS


def _end_unscored(
    session: Session,
    image_ids: Sequence[str],
    status: ImageStatus,
    code: str,
    message: str,
    **extra: object,
) -> int:
    """Non-terminal -> ``failed`` or ``skipped``, with the reason and no result row; returns
    how many changed (an image already terminal is left as it is)."""
    if not image_ids:
        return 0
    result = session.execute(
        update(Image)
        .where(Image.id.in_(image_ids), NOT_TERMINAL)
        .values(
            status=status,
            error_code=code,
            error_message=message[:500],
            finished_at=utcnow(),
            **extra,
        )
    )
    return result.rowcount


def _fail(
    session: Session, image_ids: Sequence[str], code: str, message: str, **extra: object
) -> int:
    return _end_unscored(session, image_ids, ImageStatus.FAILED, code, message, **extra)


def _complete(
    session: Session,
    classifier: Classifier,
    scored: Sequence[tuple[str, float]],
    pacs: bool = False,
) -> tuple[list[str], list[str]]:
    """Non-terminal -> completed, with their result rows, in two statements whatever the
    batch's size; returns (ids completed here, ids whose report to the PACS became owed).  An
    image already terminal is left as it is and gets no result row from here.  With ``pacs``, a
    DICOM image's report becomes pending in the same UPDATE."""
    if not scored:
        return [], []
    extra = {"pacs_delivery": OWES_REPORT} if pacs else {}
    changed = session.execute(
        update(Image)
        .where(Image.id.in_([image_id for image_id, _ in scored]), NOT_TERMINAL)
        .values(
            status=ImageStatus.COMPLETED,
            error_code=None,
            error_message=None,
            finished_at=utcnow(),
            **extra,
        )
        .returning(Image.id, Image.pacs_delivery)
        .execution_options(synchronize_session=False)
    ).all()
    done = {row.id for row in changed}
    if not done:
        return [], []
    info = classifier.info
    rows = [
        {"image_id": i, "probability": p, "label": info.label(p), "model_version": info.version}
        for i, p in scored
        if i in done
    ]
    stmt = insert_for(session, Result.__table__)
    session.execute(
        stmt.on_conflict_do_update(
            index_elements=["image_id"],
            set_={k: stmt.excluded[k] for k in ("probability", "label", "model_version")},
        ),
        rows,
    )
    owed = [row.id for row in changed if row.pacs_delivery == PacsDelivery.PENDING]
    return [r["image_id"] for r in rows], owed


def _claim(session: Session, chunk_id: str, settings: Settings) -> int | None:
    """Take the chunk (unless done) and extend its lease; returns its claim count."""
    now = utcnow()
    changed = session.execute(
        update(Chunk)
        .where(Chunk.id == chunk_id, Chunk.status != ChunkStatus.DONE)
        .values(
            status=ChunkStatus.RUNNING,
            attempts=Chunk.attempts + 1,
            lease_expires_at=now + dt.timedelta(seconds=settings.lease_seconds),
        )
    ).rowcount
    if not changed:
        return None
    return session.scalar(select(Chunk.attempts).where(Chunk.id == chunk_id))


def _start(
    session: Session, chunk_id: str, claims: int, settings: Settings, outcome: ChunkOutcome
) -> tuple[list[str], bool]:
    """Count interruptions, fail images out of attempts; returns (pending ids, isolate)."""
    rows = session.execute(
        select(Image.id, Image.status, Image.attempts)
        .where(Image.chunk_id == chunk_id, NOT_TERMINAL)
        .order_by(Image.position)
    ).all()
    if claims > MAX_CHUNK_CLAIMS:
        outcome.failed += _fail(
            session,
            [r.id for r in rows],
            TOO_MANY_ATTEMPTS,
            f"the chunk was attempted {claims} times without finishing",
        )
        return [], False
    pending: list[str] = []
    isolate = False
    for image_id, status, attempts in rows:
        if status != ImageStatus.RUNNING:
            pending.append(image_id)
            continue
        isolate = True  # an execution died while processing this image
        if attempts + 1 >= settings.max_attempts:
            outcome.failed += _fail(
                session,
                [image_id],
                TOO_MANY_ATTEMPTS,
                f"processing was interrupted {attempts + 1} times "
                "(the worker died or timed out on this image)",
                attempts=attempts + 1,
            )
            continue
        changed = session.execute(
            update(Image)
            .where(Image.id == image_id, Image.status == ImageStatus.RUNNING)
            .values(attempts=Image.attempts + 1, status=ImageStatus.QUEUED)
        ).rowcount
        if changed:
            pending.append(image_id)
    if pending and not isolate:
        _mark_running(session, pending)
    return pending, isolate


def _mark_running(session: Session, image_ids: Sequence[str]) -> int:
    return session.execute(
        update(Image)
        .where(Image.id.in_(image_ids), Image.status == ImageStatus.QUEUED)
        .values(status=ImageStatus.RUNNING, started_at=utcnow())
    ).rowcount


def _read(blobs: BlobStore, blob_key: str) -> bytes | ImageError:
    try:
        return blobs.get(blob_key)
    except BlobNotFoundError:
        return ImageError("the stored image is missing")  # code: invalid_image
    except BlobCorruptError:
        return ImageError("the stored image does not match its checksum")


def decode_threads(settings: Settings) -> int:
    """Films decoded at once: reading the blob, OpenCV and the lung segmenter release the GIL,
    so a chunk's films overlap on the worker's cores (measured: bench/bench_e2e.py)."""
    return settings.decode_threads or max(1, min(4, available_cores()))


def _decode_all(
    blobs: BlobStore, keys: Sequence[str], classifier: Classifier, settings: Settings
) -> list[np.ndarray | ImageError]:
    """Each film's model input or the reason it has none, in order: read and decoded on a
    thread pool, the lung segmenter run once for the whole chunk."""
    threads = decode_threads(settings) if len(keys) > 1 else 1
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode") as pool:
        mapper = pool.map if threads > 1 else map
        datas = list(mapper(lambda key: _read(blobs, key), keys))
        readable = [d for d in datas if not isinstance(d, ImageError)]
        inputs = iter(
            preprocess_many(
                readable,
                classifier.info.preprocess,
                settings.max_image_pixels,
                segmenter=classifier.segmenter,
                mapper=mapper,
            )
        )
    return [d if isinstance(d, ImageError) else next(inputs) for d in datas]


def _store(
    session: Session,
    classifier: Classifier,
    refused: Sequence[tuple[str, ImageError]],
    scored: Sequence[tuple[str, float]],
    pacs: bool,
    outcome: ChunkOutcome,
) -> list[str]:
    """Write one batch's outcomes; returns the ids of the images whose report became owed."""
    for image_id, error in refused:
        skip = isinstance(error, OutOfScopeError)  # readable, but not a frontal chest film
        status = ImageStatus.SKIPPED if skip else ImageStatus.FAILED
        if not _end_unscored(session, [image_id], status, error.code, error.message):
            outcome.already_done += 1
        elif skip:
            outcome.out_of_scope += 1
        else:
            outcome.failed += 1
    completed, owed = _complete(session, classifier, scored, pacs)
    outcome.completed += len(completed)
    outcome.already_done += len(scored) - len(completed)
    outcome.reports_pending += len(owed)
    return owed


def _classify(
    session_factory: sessionmaker[Session],
    image_ids: Sequence[str],
    blobs: BlobStore,
    classifier: Classifier,
    settings: Settings,
    outcome: ChunkOutcome,
    send_reports: ReportSender | None = None,
) -> None:
    """Decode and predict with no transaction open, then write everything in one short one
    (SQLite has one writer: decoding must not hold its lock); the reports owed are sent after
    it committed."""
    with session_factory() as session:
        rows = session.execute(
            select(Image.id, Image.blob_key)
            .where(Image.id.in_(image_ids), Image.status == ImageStatus.RUNNING)
            .order_by(Image.position)
        ).all()
    arrays: list[np.ndarray] = []
    ok_ids: list[str] = []
    refused: list[tuple[str, ImageError]] = []
    for (image_id, _key), decoded in zip(
        rows, _decode_all(blobs, [key for _, key in rows], classifier, settings), strict=True
    ):
        if isinstance(decoded, ImageError):
            refused.append((image_id, decoded))
        else:
            arrays.append(decoded)
            ok_ids.append(image_id)
    probs = classifier.predict(np.stack(arrays)) if arrays else np.zeros(0)
    scored = [(i, float(p)) for i, p in zip(ok_ids, probs, strict=True)]
    pacs = bool(settings.dicomweb_url)
    with session_factory.begin() as session:
        owed = _store(session, classifier, refused, scored, pacs, outcome)
    if owed and send_reports is not None:
        send_reports(owed)


def _finish(session: Session, chunk_id: str) -> bool:
    """Mark the chunk done, but only once none of its images is left non-terminal."""
    open_images = exists().where(Image.chunk_id == chunk_id, NOT_TERMINAL)
    return bool(
        session.execute(
            update(Chunk)
            .where(Chunk.id == chunk_id, ~open_images)
            .values(status=ChunkStatus.DONE, lease_expires_at=None)
        ).rowcount
    )


def release(session_factory: sessionmaker[Session], chunk_id: str) -> None:
    """After a transient error: hand the running images back, so the retry that follows is not
    counted as an interruption.  Best effort: if the database is still away, the next claim
    counts one interruption, which ``max_attempts`` leaves room for."""
    try:
        with session_factory.begin() as session:
            session.execute(
                update(Image)
                .where(Image.chunk_id == chunk_id, Image.status == ImageStatus.RUNNING)
                .values(status=ImageStatus.QUEUED)
            )
    except Exception as exc:
        log.warning("chunk %s: could not release its images (%s)", chunk_id, type(exc).__name__)


def process_chunk(
    chunk_id: str,
    session_factory: sessionmaker[Session],
    blobs: BlobStore,
    get_classifier: Callable[[], Classifier],
    settings: Settings,
    send_reports: ReportSender | None = None,
) -> ChunkOutcome:
    """Classify every non-terminal image of a chunk; safe to run any number of times, also
    concurrently.  ``send_reports`` gets the ids of the DICOM images completed here once they
    are committed (``CXR_DICOMWEB_URL`` set): the caller enqueues their report deliveries."""
    outcome = ChunkOutcome()
    with session_factory.begin() as session:
        claims = _claim(session, chunk_id, settings)
        if claims is None:
            log.info("chunk %s already done or gone; nothing to do", chunk_id)
            return outcome
        pending, isolate = _start(session, chunk_id, claims, settings, outcome)
    classifier = get_classifier()
    if not isolate:
        _classify(session_factory, pending, blobs, classifier, settings, outcome, send_reports)
    else:
        log.info("chunk %s was interrupted before: processing its images one by one", chunk_id)
        for image_id in pending:
            with session_factory.begin() as session:
                if not _mark_running(session, [image_id]):
                    outcome.already_done += 1
                    continue
            _classify(
                session_factory, [image_id], blobs, classifier, settings, outcome, send_reports
            )
    with session_factory.begin() as session:
        if not _finish(session, chunk_id):
            log.warning(
                "chunk %s still has unfinished images; its lease will bring it back", chunk_id
            )
    return outcome
