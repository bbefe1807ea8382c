"""DICOMweb STOW-RS receiver: ``POST /dicomweb/studies[/{study}]`` (PS3.18 §10.5).

A PACS configured with ``<our URL>/dicomweb`` as a DICOMweb server pushes studies here.  Each
request becomes one job (source ``stow``), through the same door as uploads
(:func:`api.ingest.ingest`: de-identified before storage, UIDs kept in their own columns) and
the same limits.  Invariant: every part received ends as exactly one image row, and the answer
lists each instance as stored (ReferencedSOPSequence) or failed (FailedSOPSequence), with the
job's URL in ``Content-Location``.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from flask import Blueprint, Response, request, url_for
from pydicom import Dataset

from api.auth import authenticate, current_principal
from api.errors import APIError, ErrorCode
from api.extensions import service
from api.multipart_related import iter_parts
from api.quotas import admit
from api.uploads import Budget
from shared.dispatch import dispatch
from shared.imaging import StudyMismatchError
from shared.ingest import ingest, refuse
from shared.models import Image, ImageStatus, Job, new_id
from shared.planning import add_plan, plan_job

log = logging.getLogger(__name__)

bp = Blueprint("dicomweb", __name__)
bp.before_request(authenticate)

DICOM = "application/dicom"
DICOM_JSON = "application/dicom+json"
# PS3.18 Table I.2-1 failure reasons
PROCESSING_FAILURE = 0x0110
CANNOT_UNDERSTAND = 0xC000
NOT_IN_STUDY = 0xA900  # "data set does not match": an instance of another study than the path's


def _boundary() -> str:
    """The body's boundary, once the request is known to be DICOM instances."""
    if request.mimetype != "multipart/related":
        raise APIError(
            ErrorCode.UNSUPPORTED_MEDIA_TYPE,
            'send multipart/related; type="application/dicom" (DICOM Part 10 instances)',
        )
    part_type = request.mimetype_params.get("type", DICOM).strip('"').lower()
    if part_type != DICOM:
        raise APIError(
            ErrorCode.UNSUPPORTED_MEDIA_TYPE,
            f"only type={DICOM} is accepted (not metadata with bulk data)",
        )
    boundary = request.mimetype_params.get("boundary")
    if not boundary:
        raise APIError(ErrorCode.BAD_REQUEST, "the multipart/related body has no boundary")
    return boundary


def _receive(job_id: str, study_uid: str | None) -> list[Image]:
    state = service.state
    settings = state.settings
    budget = Budget(max_files=settings.max_files_per_job, max_bytes=settings.max_request_bytes)
    images = []
    parts = iter_parts(request.stream, _boundary(), settings.max_file_bytes, budget)
    for position, part in enumerate(parts):
        image = ingest(
            state.blobs,
            job_id,
            position,
            f"instance-{position + 1}.dcm",
            part.data,
            settings.max_image_pixels,
        )
        if study_uid and image.study_instance_uid not in (None, study_uid):
            refuse(image, StudyMismatchError("the instance belongs to another study"))
        images.append(image)
    if not images:
        raise APIError(ErrorCode.NO_FILES, "the request holds no DICOM instances")
    return images


def _sop_item(image: Image, retrieve_url: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = image.sop_class_uid or ""
    item.ReferencedSOPInstanceUID = image.sop_instance_uid or ""
    if image.status == ImageStatus.FAILED:
        item.FailureReason = (
            NOT_IN_STUDY if image.error_code == StudyMismatchError.code else CANNOT_UNDERSTAND
        )
    else:
        item.RetrieveURL = retrieve_url
    return item


def _stow_response(job: Job, images: list[Image]) -> dict[str, Any]:
    job_url = url_for("jobs.get_job", job_id=job.id, _external=True)
    answer = Dataset()
    answer.RetrieveURL = job_url
    stored = [i for i in images if i.status != ImageStatus.FAILED]
    failed = [i for i in images if i.status == ImageStatus.FAILED]
    answer.ReferencedSOPSequence = [_sop_item(i, job_url) for i in stored]
    if failed:
        answer.FailedSOPSequence = [_sop_item(i, job_url) for i in failed]
    return answer.to_json_dict()


@bp.post("/studies")
@bp.post("/studies/<study_uid>")
def store_instances(study_uid: str | None = None) -> Response:
    state = service.state
    if state.model is None:
        raise APIError(ErrorCode.MODEL_UNAVAILABLE, "the model is not available; see /readyz")
    principal = current_principal()
    admit(state, principal)  # before the body is read: a refusal stores nothing
    job = Job(
        id=new_id(),
        client=principal.client,
        priority=principal.priority,
        model_version=state.model.version,
        source="stow",
    )
    images = _receive(job.id, study_uid)
    plan = plan_job(job, images, state.settings.chunk_size)
    with state.sessions.begin() as session:
        add_plan(session, plan)
    dispatch(state.celery, state.sessions, state.settings)
    failures = sum(i.status == ImageStatus.FAILED for i in images)
    log.info("stow job %s: %d instances, %d refused", job.id, len(images), failures)
    # PS3.18: 200 all stored; 202 some failed; 409 none could be stored
    status = 200 if not failures else 409 if failures == len(images) else 202
    response = Response(json.dumps(_stow_response(job, images)), status=status, mimetype=DICOM_JSON)
    response.headers["Content-Location"] = url_for("jobs.get_job", job_id=job.id)
    return response
