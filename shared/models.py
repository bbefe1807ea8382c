"""SQLAlchemy 2.0 models: jobs, their chunks (units of work), images and results.

Job status is never stored: it is derived from the per-image statuses, which are the only
truth, so it cannot drift.  Image statuses are plain strings (not a DB enum) so that later
states (e.g. ``deidentifying``) need no type migration.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping
from enum import StrEnum

from sqlalchemy import (
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from shared.db import utcnow


def new_id() -> str:
    return str(uuid.uuid4())


class ImageStatus(StrEnum):
    """Every accepted image ends in exactly one terminal status (:data:`TERMINAL_IMAGE`):
    ``completed`` (with exactly one result row), ``failed`` (an error code and message: the image
    could not be processed) or ``skipped`` (an error code and message: a readable image that is
    out of the model's scope, e.g. ``not_frontal_chest_xray``; never scored, no result row)."""

    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    SKIPPED = "skipped"


TERMINAL_IMAGE = frozenset({ImageStatus.COMPLETED, ImageStatus.FAILED, ImageStatus.SKIPPED})


class PacsDelivery(StrEnum):
    """Where the report on a scored DICOM image stands with the hospital's PACS (null: nothing
    to send: not DICOM, not scored, or no ``CXR_DICOMWEB_URL``)."""

    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"


class PullStatus(StrEnum):
    """A job that pulls its images from the PACS (DICOMweb QIDO-RS + WADO-RS) in a worker:
    ``pending`` until every matching instance is stored as an image, then ``done``; ``failed``
    (with a code) when the PACS could not be searched or reached."""

    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"


class CallbackStatus(StrEnum):
    """A job's signed callback (``callback_url``): ``pending`` until the job ends and then
    while it is retried, then ``delivered`` (a 2xx answer) or ``failed`` (with a code)."""

    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


class ChunkStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"


class JobStatus(StrEnum):
    """Derived from the image statuses (:func:`job_status`), never stored."""

    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    COMPLETED_WITH_ERRORS = "completed_with_errors"
    FAILED = "failed"


TERMINAL_JOB = frozenset({JobStatus.COMPLETED, JobStatus.COMPLETED_WITH_ERRORS, JobStatus.FAILED})


def job_status(counts: Mapping[str, int], pull: str | None = None) -> JobStatus:
    """The job status from its images' status counts (and, for a job that pulls from the PACS,
    its pull status: images still arriving keep it ``queued``/``running``; a pull that failed
    before any image arrived makes it ``failed``; a pull that matched nothing ``completed``):

    * ``queued``: no images, or all of them queued;
    * ``running``: some image is not terminal yet;
    * ``completed``: every image is ``completed`` or ``skipped`` (none ``failed``), also when
      all of them are skipped: a skipped image is a finished answer ("not in scope"), not
      an error;
    * ``failed``: every image is ``failed``;
    * ``completed_with_errors``: some ``failed``, the rest ``completed`` or ``skipped``
      (so ``skipped`` + ``failed`` with nothing ``completed`` is this, not ``failed``).
    """
    total = sum(counts.values())
    if pull == PullStatus.PENDING:
        return JobStatus.QUEUED if total == 0 else JobStatus.RUNNING
    if total == 0 and pull is not None:
        return JobStatus.FAILED if pull == PullStatus.FAILED else JobStatus.COMPLETED
    failed = counts.get(ImageStatus.FAILED, 0)
    finished = sum(counts.get(s, 0) for s in TERMINAL_IMAGE)
    if total == 0 or counts.get(ImageStatus.QUEUED, 0) == total:
        return JobStatus.QUEUED
    if finished < total:
        return JobStatus.RUNNING
    if failed == 0:
        return JobStatus.COMPLETED
    if failed == total:
        return JobStatus.FAILED
    return JobStatus.COMPLETED_WITH_ERRORS


class Base(DeclarativeBase):
    pass


Timestamp = DateTime(timezone=True)


ANONYMOUS_CLIENT = "anonymous"  # owner of every job when authentication is disabled


class ApiKey(Base):
    """Only the sha256 of a key is stored; keys are 256-bit random, so no slow hash is needed."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    client: Mapped[str] = mapped_column(String(100), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(12))  # shown in listings, to tell keys apart
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(Timestamp, default=utcnow)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(Timestamp)
    # fairness and backpressure (shared/dispatch.py, api/quotas.py): the priority of the jobs
    # this key submits (higher: dispatched first), and its own limits (null: the settings')
    priority: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    max_images_in_flight: Mapped[int | None] = mapped_column(Integer)
    max_submissions_per_minute: Mapped[int | None] = mapped_column(Integer)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("client", "idempotency_key", name="uq_jobs_client_idempotency_key"),
        Index("ix_jobs_client_created", "client", "created_at"),
        # the sweeper: callbacks still pending, by when their next attempt is due
        Index("ix_jobs_callback", "callback_status", "callback_next_at"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    client: Mapped[str] = mapped_column(
        String(100), default=ANONYMOUS_CLIENT, server_default=ANONYMOUS_CLIENT
    )
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    client_ref: Mapped[str | None] = mapped_column(String(500))
    model_version: Mapped[str] = mapped_column(String(100))
    # how the images came: "upload" (POST /v1/jobs), "stow" (DICOMweb STOW-RS) or "pull"
    source: Mapped[str] = mapped_column(String(16), default="upload", server_default="upload")
    # copied from the submitting key: its chunks are dispatched before those of lower priority
    priority: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # pull jobs only: what to fetch (JSON: study UIDs or a QIDO-RS query without patient
    # identifiers), and how the pull stands
    pull_request: Mapped[str | None] = mapped_column(Text)
    pull_status: Mapped[str | None] = mapped_column(String(16))
    pull_error_code: Mapped[str | None] = mapped_column(String(64))
    pull_attempted_at: Mapped[dt.datetime | None] = mapped_column(Timestamp)
    created_at: Mapped[dt.datetime] = mapped_column(Timestamp, default=utcnow)
    # the signed callback POSTed when the job ends (shared/callbacks.py, worker/callbacks.py):
    # due_at is when the job ended (null until then); next_at is when the next attempt may
    # start (an attempt in flight pushes it out by the task time limit, so no two overlap)
    callback_url: Mapped[str | None] = mapped_column(Text)
    callback_status: Mapped[str | None] = mapped_column(String(16))
    callback_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    callback_due_at: Mapped[dt.datetime | None] = mapped_column(Timestamp)
    callback_next_at: Mapped[dt.datetime | None] = mapped_column(Timestamp)
    callback_error_code: Mapped[str | None] = mapped_column(String(64))
    callback_http_status: Mapped[int | None] = mapped_column(Integer)
    callback_delivered_at: Mapped[dt.datetime | None] = mapped_column(Timestamp)


class CallbackSecret(Base):
    """A client's callback signing secret.  Stored as is: signing needs the secret itself, so
    it cannot be hashed like an API key."""

    __tablename__ = "callback_secrets"

    client: Mapped[str] = mapped_column(String(100), primary_key=True)
    secret: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[dt.datetime] = mapped_column(Timestamp, default=utcnow)


class Chunk(Base):
    """A unit of work: one Celery task classifies the images of one chunk in one batch."""

    __tablename__ = "chunks"
    __table_args__ = (
        Index("ix_chunks_status_enqueued", "status", "enqueued_at"),
        Index("ix_chunks_status_lease", "status", "lease_expires_at"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    status: Mapped[str] = mapped_column(String(16), default=ChunkStatus.QUEUED)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(Timestamp, default=utcnow)
    enqueued_at: Mapped[dt.datetime | None] = mapped_column(Timestamp)
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(Timestamp)


class Image(Base):
    __tablename__ = "images"
    __table_args__ = (
        UniqueConstraint("job_id", "position", name="uq_images_job_position"),
        Index("ix_images_job_status", "job_id", "status"),
        Index("ix_images_job_study", "job_id", "study_instance_uid"),
        Index("ix_images_pacs_delivery", "pacs_delivery"),
        # /metrics and `cxr status`: images by status, and those finished in the last minute
        Index("ix_images_status_finished", "status", "finished_at"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    # NULL for images refused at submission (a bad header: failed; a child's film: skipped):
    # they never reach a worker
    chunk_id: Mapped[str | None] = mapped_column(
        ForeignKey("chunks.id", ondelete="CASCADE"), index=True
    )
    position: Mapped[int] = mapped_column(Integer)
    filename: Mapped[str] = mapped_column(String(255))
    blob_key: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default=ImageStatus.QUEUED)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(String(500))
    created_at: Mapped[dt.datetime] = mapped_column(Timestamp, default=utcnow)
    started_at: Mapped[dt.datetime | None] = mapped_column(Timestamp)
    finished_at: Mapped[dt.datetime | None] = mapped_column(Timestamp)
    # DICOM input only: the source's UIDs, kept (the stored file has new ones) so that results
    # can be sent back into the right study; null for PNG/JPEG
    study_instance_uid: Mapped[str | None] = mapped_column(String(64))
    series_instance_uid: Mapped[str | None] = mapped_column(String(64))
    sop_instance_uid: Mapped[str | None] = mapped_column(String(64))
    sop_class_uid: Mapped[str | None] = mapped_column(String(64))
    pacs_delivery: Mapped[str | None] = mapped_column(String(16))
    pacs_error_code: Mapped[str | None] = mapped_column(String(64))
    pacs_attempted_at: Mapped[dt.datetime | None] = mapped_column(Timestamp)


class Result(Base):
    """At most one per image: written by upsert, so a redelivered chunk cannot duplicate it."""

    __tablename__ = "results"

    image_id: Mapped[str] = mapped_column(
        ForeignKey("images.id", ondelete="CASCADE"), primary_key=True
    )
    probability: Mapped[float] = mapped_column(Float)
    label: Mapped[str] = mapped_column(String(16))
    model_version: Mapped[str] = mapped_column(String(100))
