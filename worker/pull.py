"""Pull jobs: find a job's instances in the PACS (QIDO-RS) and retrieve them (WADO-RS).

Invariant: every retrieved instance goes through the same door as an upload
(:func:`shared.ingest.ingest`: de-identified before storage) and becomes an image planned and
committed in batches, each dispatched after its commit (shared/dispatch.py: in its turn with
every client's chunks), so a crash loses at most the batch in hand; a re-run skips the
instances the job already holds, so it never stores one twice.  Only CR and DX series are
retrieved: a CT study is not pulled slice by slice to be skipped.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass

from celery import Celery
from dicomweb_client import DICOMwebClient
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from shared.db import utcnow
from shared.dicomweb import retrieve_part10, search
from shared.dispatch import dispatch
from shared.ingest import ingest
from shared.models import Image, Job, PullStatus
from shared.planning import plan_job
from shared.settings import Settings
from shared.storage import BlobStore

log = logging.getLogger(__name__)

RADIOGRAPHS = ("CR", "DX")
STUDY_UID, SERIES_UID, SOP_UID, MODALITY = "0020000D", "0020000E", "00080018", "00080060"


@dataclass(frozen=True)
class Instance:
    study: str
    series: str
    sop: str


def _value(item: dict, tag: str) -> str | None:
    values = item.get(tag, {}).get("Value") or [None]
    return values[0]


def _studies(client: DICOMwebClient, request: dict) -> list[str]:
    if "study_uids" in request:
        return list(request["study_uids"])
    found = search(client, "studies", search_filters=request["query"])
    return [uid for uid in (_value(s, STUDY_UID) for s in found) if uid]


def find_instances(client: DICOMwebClient, request: dict) -> Iterator[Instance]:
    """Every instance of the requested studies' radiograph series, study by study."""
    for study in _studies(client, request):
        for series in search(client, "series", study_instance_uid=study):
            if _value(series, MODALITY) not in RADIOGRAPHS:
                continue
            series_uid = _value(series, SERIES_UID)
            found = search(
                client, "instances", study_instance_uid=study, series_instance_uid=series_uid
            )
            for item in found:
                yield Instance(study, series_uid, _value(item, SOP_UID))


def _held(session: Session, job_id: str) -> tuple[set[str], int]:
    """The SOP instances the job already holds, and its next free position."""
    rows = session.execute(select(Image.sop_instance_uid).where(Image.job_id == job_id)).scalars()
    held = {uid for uid in rows if uid}
    count = session.scalar(select(func.count()).where(Image.job_id == job_id)) or 0
    return held, count


def _commit_batch(
    sessions: sessionmaker[Session], celery: Celery, job: Job, batch: list[Image], settings
) -> None:
    plan = plan_job(job, batch, settings.chunk_size)
    with sessions.begin() as session:
        session.add_all(plan.chunks)
        session.flush()
        session.add_all(plan.images)
    dispatch(celery, sessions, settings)


def end_pull(sessions: sessionmaker[Session], job_id: str, status: PullStatus, code=None) -> bool:
    with sessions.begin() as session:
        return bool(
            session.execute(
                update(Job)
                .where(Job.id == job_id, Job.pull_status == PullStatus.PENDING)
                .values(pull_status=status, pull_error_code=code)
            ).rowcount
        )


def pull(
    job_id: str,
    sessions: sessionmaker[Session],
    client: DICOMwebClient | None,
    blobs: BlobStore,
    celery: Celery,
    settings: Settings,
) -> int:
    """Retrieve what the job asks for; returns how many instances were stored this run."""
    if client is None:  # this worker has no CXR_DICOMWEB_URL: nothing to pull from
        end_pull(sessions, job_id, PullStatus.FAILED, "pacs_not_configured")
        return 0
    with sessions.begin() as session:
        job = session.get(Job, job_id)
        if job is None or job.pull_status != PullStatus.PENDING:
            return 0
        job.pull_attempted_at = utcnow()
        held, position = _held(session, job_id)
    request = json.loads(job.pull_request or "{}")
    stored, batch = 0, []
    for instance in find_instances(client, request):
        if instance.sop in held:
            continue
        if position >= settings.max_files_per_job:
            end_pull(sessions, job_id, PullStatus.DONE, "too_many_instances")
            break
        data = retrieve_part10(client, instance.study, instance.series, instance.sop)
        batch.append(
            ingest(blobs, job_id, position, f"{instance.sop}.dcm", data, settings.max_image_pixels)
        )
        held.add(instance.sop)
        position, stored = position + 1, stored + 1
        if len(batch) >= settings.chunk_size:
            _commit_batch(sessions, celery, job, batch, settings)
            batch = []
    if batch:
        _commit_batch(sessions, celery, job, batch, settings)
    end_pull(sessions, job_id, PullStatus.DONE)
    log.info("pull job %s: %d instances stored", job_id, stored)
    return stored
