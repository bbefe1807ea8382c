"""``/v1/jobs``: bulk submission, polling, CSV export."""

from __future__ import annotations

import csv
import io
import logging
import math
from collections.abc import Iterator

from flask import Blueprint, Response, jsonify, request, stream_with_context, url_for
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.auth import authenticate, caller_may_read, current_principal
from api.errors import APIError, ErrorCode
from api.extensions import service
from api.pull import pull_request
from api.queries import (
    DEFAULT_PER_PAGE,
    image_dict,
    image_page,
    int_arg,
    job_images,
    job_studies,
    job_summary,
    parse_id,
)
from api.quotas import admit
from api.uploads import iter_uploads
from shared import logs
from shared.callbacks import (
    HOST_NOT_ALLOWED,
    CallbackUrlError,
    allow_list,
    callback_if_ended,
    check_url,
)
from shared.dispatch import dispatch
from shared.ingest import ingest
from shared.models import CallbackStatus, Image, ImageStatus, Job, PullStatus, new_id
from shared.planning import JobPlan, add_plan, plan_job
from shared.queue import enqueue_pull

log = logging.getLogger(__name__)

bp = Blueprint("jobs", __name__)
bp.before_request(authenticate)

MAX_CLIENT_REF = 500
MAX_IDEMPOTENCY_KEY = 200


def _idempotency_key() -> str | None:
    raw = request.headers.get("Idempotency-Key")
    if raw is None:
        return None
    key = raw.strip()
    if not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY:
        raise APIError(
            ErrorCode.INVALID_PARAMETER,
            f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} characters",
        )
    return key


def _existing_job_id(client: str, key: str) -> str | None:
    with service.state.sessions() as session:
        return session.scalar(
            select(Job.id).where(Job.client == client, Job.idempotency_key == key)
        )


def _replay(job_id: str) -> tuple[Response, int, dict[str, str]]:
    """The answer to a retried submission: the original job, as it stands now."""
    with service.state.sessions() as session:
        job = session.get(Job, job_id)
        body = job_summary(session, job)
        rows = session.execute(job_images(job_id)).all()
    body["images"] = [image_dict(image, result) for image, result in rows]
    headers = {"Location": url_for("jobs.get_job", job_id=job_id), "Idempotent-Replayed": "true"}
    return jsonify(body), 200, headers


def _check_submission() -> None:
    """Refusals that need no file read: no model to score with, or not a multipart body."""
    if service.state.model is None:
        raise APIError(ErrorCode.MODEL_UNAVAILABLE, "the model is not available; see /readyz")
    if request.mimetype not in ("multipart/form-data", "application/json"):
        raise APIError(
            ErrorCode.UNSUPPORTED_MEDIA_TYPE,
            "send multipart/form-data with the images in the field 'files', or a JSON pull request",
        )


def _client_ref() -> str | None:
    if request.is_json:
        body = request.get_json(silent=True)
        client_ref = body.get("client_ref") if isinstance(body, dict) else None
    else:
        client_ref = request.form.get("client_ref")
    if client_ref is None:
        return None
    if not isinstance(client_ref, str):
        raise APIError(ErrorCode.INVALID_PARAMETER, "client_ref must be a string")
    if len(client_ref) > MAX_CLIENT_REF:
        raise APIError(ErrorCode.INVALID_PARAMETER, f"client_ref is longer than {MAX_CLIENT_REF}")
    if any(not ch.isprintable() for ch in client_ref):
        raise APIError(ErrorCode.INVALID_PARAMETER, "client_ref holds control characters")
    return client_ref


def _callback_url() -> str | None:
    """The optional ``callback_url`` (a form field, or a field of a JSON pull request), checked
    against the operator's policy before any file is stored."""
    if request.is_json:
        body = request.get_json(silent=True)
        url = body.get("callback_url") if isinstance(body, dict) else None
    else:
        url = request.form.get("callback_url")
    if url is None:
        return None
    try:
        check_url(url, allow_list(service.state.settings.callback_allowed_hosts))
    except CallbackUrlError as exc:
        code = (
            ErrorCode.CALLBACK_HOST_NOT_ALLOWED
            if exc.code == HOST_NOT_ALLOWED
            else ErrorCode.INVALID_CALLBACK_URL
        )
        raise APIError(code, exc.message) from None
    return url


def _store_uploads(job_id: str) -> list[Image]:
    """One row per submitted file, each stored durably before the next is read (and let go)."""
    state = service.state
    settings = state.settings
    uploads = iter_uploads(request.files.getlist("files"), settings)
    return [
        ingest(
            state.blobs, job_id, position, upload.filename, upload.data, settings.max_image_pixels
        )
        for position, upload in enumerate(uploads)
    ]


def _pull_from_pacs(job: Job) -> list[Image]:
    """A pull job starts with no images: a worker searches and retrieves them."""
    request_json = pull_request()  # a malformed request is the client's to fix first
    if not service.state.settings.dicomweb_url:
        raise APIError(
            ErrorCode.PACS_NOT_CONFIGURED, "this server has no PACS to pull from (CXR_DICOMWEB_URL)"
        )
    job.source = "pull"
    job.pull_request = request_json
    job.pull_status = PullStatus.PENDING
    return []


def _commit(plan: JobPlan) -> str | None:
    """Write the plan; returns the id of the job that won instead, when a concurrent retry
    with the same Idempotency-Key committed first."""
    try:
        with service.state.sessions.begin() as session:
            add_plan(session, plan)
    except IntegrityError:
        key = plan.job.idempotency_key
        winner = None if key is None else _existing_job_id(plan.job.client, key)
        if winner is None:
            raise
        return winner
    return None


@bp.post("")
def create_job() -> tuple[Response, int, dict[str, str]]:
    """validate → admit (quotas) → plan the rows → commit (or replay) → dispatch."""
    state = service.state
    _check_submission()
    principal = current_principal()
    idempotency_key = _idempotency_key()
    if idempotency_key is not None:
        existing = _existing_job_id(principal.client, idempotency_key)
        if existing is not None:
            return _replay(existing)
    admit(state, principal)  # before the body is read: a refusal stores nothing
    client_ref, callback_url = _client_ref(), _callback_url()
    job = Job(
        id=new_id(),
        client=principal.client,
        priority=principal.priority,
        idempotency_key=idempotency_key,
        client_ref=client_ref,
        model_version=state.model.version,
        callback_url=callback_url,
        callback_status=CallbackStatus.PENDING if callback_url else None,
    )
    logs.bind(job_id=job.id)
    images = _pull_from_pacs(job) if request.is_json else _store_uploads(job.id)
    plan = plan_job(job, images, state.settings.chunk_size)
    winner = _commit(plan)
    if winner is not None:
        return _replay(winner)
    # Only after the commit: a worker must never see a chunk that is not in the database.  The
    # job's chunks wait their turn with everyone's (shared/dispatch.py): some may go now.
    dispatch(state.celery, state.sessions, state.settings)
    if job.pull_status is not None:
        enqueue_pull(state.celery, job.id)
    if job.callback_url:  # every image refused at the door: the job has ended already
        callback_if_ended(state.celery, state.sessions, job_id=job.id)
    log.info("job %s accepted: %d images, %d chunks", job.id, len(images), len(plan.chunks))
    with state.sessions() as session:
        body = job_summary(session, job)
    body["images"] = [image_dict(image, None) for image in images]
    return jsonify(body), 202, {"Location": url_for("jobs.get_job", job_id=job.id)}


def load_job(session: Session, job_id: str) -> Job:
    """The job, if it exists *and* the caller may see it: 404 either way, so no client can
    learn that another's job exists."""
    job = session.scalar(
        select(Job).where(Job.id == parse_id(job_id, "job"), caller_may_read(Job.client))
    )
    if job is None:
        raise APIError(ErrorCode.JOB_NOT_FOUND, f"no job with id {job_id!r}")
    return job


@bp.get("/<job_id>")
def get_job(job_id: str) -> Response:
    state = service.state
    page = int_arg("page", 1, 1, 10**9)
    # per_page=0: the summary alone, no image query: what a client waiting for its job needs
    per_page = int_arg("per_page", DEFAULT_PER_PAGE, 0, state.settings.max_per_page)
    status = request.args.get("status") or None
    if status is not None and status not in {s.value for s in ImageStatus}:
        raise APIError(
            ErrorCode.INVALID_PARAMETER,
            f"status must be one of {', '.join(s.value for s in ImageStatus)}",
        )
    with state.sessions() as session:
        job = load_job(session, job_id)
        body = job_summary(session, job)
        if per_page:
            items, total = image_page(session, job.id, page, per_page, status)
        else:
            items, total = [], body["counts"][status] if status else body["image_count"]
    body["images"] = items
    body["pagination"] = {
        "page": page,
        "per_page": per_page,
        "total": total,
        "pages": math.ceil(total / per_page) if total and per_page else 0,
    }
    return jsonify(body)


@bp.get("/<job_id>/studies")
def get_studies(job_id: str) -> Response:
    """The job's DICOM studies, one row each (empty for a job without DICOM input)."""
    with service.state.sessions() as session:
        job = load_job(session, job_id)
        studies = job_studies(session, job.id)
    return jsonify({"job_id": job.id, "studies": studies})


CSV_COLUMNS = (
    "image_id",
    "filename",
    "status",
    "probability",
    "label",
    "error_code",
    "error_message",
    "model_version",
    "study_instance_uid",
    "series_instance_uid",
    "sop_instance_uid",
    "pacs_delivery",
)


@bp.get("/<job_id>/results.csv")
def results_csv(job_id: str) -> Response:
    state = service.state
    with state.sessions() as session:
        job_id = load_job(session, job_id).id

    def rows() -> Iterator[str]:
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(CSV_COLUMNS)
        with state.sessions() as session:
            query = job_images(job_id).execution_options(yield_per=500)
            for n, (image, result) in enumerate(session.execute(query)):
                writer.writerow(
                    (
                        image.id,
                        image.filename,
                        image.status,
                        "" if result is None else f"{result.probability:.6f}",
                        "" if result is None else result.label,
                        image.error_code or "",
                        image.error_message or "",
                        "" if result is None else result.model_version,
                        image.study_instance_uid or "",
                        image.series_instance_uid or "",
                        image.sop_instance_uid or "",
                        image.pacs_delivery or "",
                    )
                )
                if n % 500 == 0:
                    yield buf.getvalue()
                    buf.seek(0)
                    buf.truncate()
        yield buf.getvalue()

    return Response(
        stream_with_context(rows()),
        mimetype="text/csv",
        headers={"Content-Disposition": f'attachment; filename="job-{job_id}.csv"'},
    )
