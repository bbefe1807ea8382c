"""Sending one image's report to the PACS: fetch the source's metadata, build the SR, STOW it.

Invariant: an image's ``pacs_delivery`` leaves ``pending`` once, by a conditional UPDATE, for
exactly one of ``sent`` or ``failed`` (with ``pacs_error_code``); an image not ``pending`` is
left alone, so a redelivered or duplicated task changes nothing.  Two executions racing each
other may both send the report, but it is the same instance: its series and SOP Instance UIDs
are derived from the image's id, so the PACS keeps one.  Transient failures (the PACS or the
database unreachable) raise, the image stays ``pending`` and the task retries; the caller ends
the delivery with :func:`give_up` when its retries are spent.  ``pacs_attempted_at`` is stamped
as each attempt starts: the sweeper takes a pending delivery with no recent attempt as lost.

The patient and study attributes of the report exist only in memory, for the length of one
attempt: fetched from the PACS, put into the SR, sent back.  Nothing here stores or logs them.
"""

from __future__ import annotations

import logging
import uuid
from typing import NamedTuple

from dicomweb_client import DICOMwebClient
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from shared.db import utcnow
from shared.dicomweb import (
    PacsBadResponseError,
    PacsNotFoundError,
    PacsRejectedError,
    retrieve_instance_metadata,
    store_instances,
)
from shared.model_store import ModelInfo
from shared.models import Image, PacsDelivery, Result
from shared.settings import Settings
from worker.report import ReportError, build_report

log = logging.getLogger(__name__)

SOURCE_NOT_IN_PACS = "source_not_in_pacs"
PACS_REJECTED = "pacs_rejected"
PACS_UNREACHABLE = "pacs_unreachable"
INVALID_SOURCE_METADATA = "invalid_source_metadata"
PACS_NOT_CONFIGURED = "pacs_not_configured"
INTERNAL_ERROR = "internal_error"  # a bug: the task failed in a way it does not know
#: What :func:`deliver` returns for an image with nothing to deliver.
NOTHING = "none"

#: The namespace of the UIDs derived from image ids (a fixed, random UUID: PS3.5 B.2, "2.25.").
_UID_NAMESPACE = uuid.UUID("3f0d7a52-8c1e-4b7e-9d55-2a8f4c1b6e93")


def report_uids(image_id: str) -> tuple[str, str]:
    """(Series Instance UID, SOP Instance UID) of an image's report, the same on every try."""
    return tuple(  # type: ignore[return-value]
        f"2.25.{uuid.uuid5(_UID_NAMESPACE, f'{image_id}/{part}').int}"
        for part in ("series", "instance")
    )


class _Pending(NamedTuple):
    study: str
    series: str
    sop: str
    probability: float
    label: str
    model_version: str


def _claim(session: Session, image_id: str) -> _Pending | None:
    """The image's UIDs and result if its delivery is pending (stamping the attempt), else
    None."""
    row = session.execute(
        select(
            Image.study_instance_uid,
            Image.series_instance_uid,
            Image.sop_instance_uid,
            Result.probability,
            Result.label,
            Result.model_version,
        )
        .join(Result, Result.image_id == Image.id)
        .where(Image.id == image_id, Image.pacs_delivery == PacsDelivery.PENDING)
    ).first()
    if row is None:
        return None
    session.execute(
        update(Image)
        .where(Image.id == image_id, Image.pacs_delivery == PacsDelivery.PENDING)
        .values(pacs_attempted_at=utcnow())
    )
    return _Pending(*row)


def _state(session_factory: sessionmaker[Session], image_id: str) -> str:
    with session_factory() as session:
        state = session.scalar(select(Image.pacs_delivery).where(Image.id == image_id))
    return state or NOTHING


def _end(
    session_factory: sessionmaker[Session],
    image_id: str,
    state: PacsDelivery,
    code: str | None = None,
) -> str:
    """pending -> ``state`` (with ``code``); returns the state the image is in afterwards."""
    with session_factory.begin() as session:
        changed = session.execute(
            update(Image)
            .where(Image.id == image_id, Image.pacs_delivery == PacsDelivery.PENDING)
            .values(pacs_delivery=state, pacs_error_code=code, pacs_attempted_at=utcnow())
        ).rowcount
    if not changed:
        return _state(session_factory, image_id)
    if code is None:
        log.info("image %s: report sent to the PACS", image_id)
    else:
        log.warning("image %s: report not delivered (%s)", image_id, code)
    return state


def give_up(image_id: str, session_factory: sessionmaker[Session]) -> str:
    """After the last retry: the PACS stayed unreachable."""
    return fail(image_id, session_factory, PACS_UNREACHABLE)


def fail(image_id: str, session_factory: sessionmaker[Session], code: str) -> str:
    """pending -> failed with ``code``; returns the state afterwards."""
    return _end(session_factory, image_id, PacsDelivery.FAILED, code)


def _send(
    client: DICOMwebClient, image_id: str, pending: _Pending, model: ModelInfo | None
) -> str | None:
    """Fetch, build, store; returns None when stored, else the error code (a permanent
    failure).  Transient errors (:class:`shared.dicomweb.PacsUnavailableError`) propagate."""
    try:
        source = retrieve_instance_metadata(client, pending.study, pending.series, pending.sop)
    except PacsNotFoundError:
        return SOURCE_NOT_IN_PACS
    except PacsBadResponseError:
        return INVALID_SOURCE_METADATA
    except PacsRejectedError:
        return PACS_REJECTED
    threshold = model.threshold if model and model.version == pending.model_version else None
    series_uid, sop_uid = report_uids(image_id)
    try:
        report = build_report(
            source,
            pending.probability,
            pending.label,
            threshold,
            pending.model_version,
            series_instance_uid=series_uid,
            sop_instance_uid=sop_uid,
        )
    except ReportError:
        return INVALID_SOURCE_METADATA
    try:
        store_instances(client, [report])
    except PacsRejectedError:  # also a 404: the STOW endpoint is not where we were told
        return PACS_REJECTED
    return None


def deliver(
    image_id: str,
    session_factory: sessionmaker[Session],
    client: DICOMwebClient | None,
    settings: Settings,
    model: ModelInfo | None = None,
) -> str:
    """Send the report on one scored image to the PACS, if its delivery is pending; returns its
    delivery state afterwards (``sent``, ``failed``, ``pending`` or ``none``).

    ``model`` is the model this worker knows: the report states its threshold when it is the
    model that scored the image (else the threshold is left out).  ``client`` None (no
    ``CXR_DICOMWEB_URL`` in this worker) fails the delivery as ``pacs_not_configured``.
    ``settings`` is unused so far: the client carries the PACS's own.
    Raises :class:`shared.dicomweb.PacsUnavailableError` (and database errors) when worth a retry.
    """
    with session_factory.begin() as session:
        pending = _claim(session, image_id)
    if pending is None:
        return _state(session_factory, image_id)
    if client is None:
        return _end(session_factory, image_id, PacsDelivery.FAILED, PACS_NOT_CONFIGURED)
    code = _send(client, image_id, pending, model)
    if code is not None:
        return _end(session_factory, image_id, PacsDelivery.FAILED, code)
    return _end(session_factory, image_id, PacsDelivery.SENT)
