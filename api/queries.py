"""Reads shared by the job and image endpoints."""

from __future__ import annotations

import uuid
from typing import Any, Literal

from flask import request
from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from api.errors import APIError, ErrorCode
from shared.models import Image, ImageStatus, Result
from shared.summary import iso, job_summary  # noqa: F401  (shared with the job's callback)

DEFAULT_PER_PAGE = 100


NOT_FOUND = {"job": ErrorCode.JOB_NOT_FOUND, "image": ErrorCode.IMAGE_NOT_FOUND}


def parse_id(value: str, what: Literal["job", "image"]) -> str:
    """Ids are UUIDs; anything else cannot name a resource, so it is a 404 as well."""
    try:
        return str(uuid.UUID(value))
    except (ValueError, AttributeError):
        raise APIError(NOT_FOUND[what], f"no {what} with id {value[:64]!r}") from None


def int_arg(name: str, default: int, lo: int, hi: int) -> int:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise APIError(ErrorCode.INVALID_PARAMETER, f"{name} must be an integer") from None
    if not lo <= value <= hi:
        raise APIError(ErrorCode.INVALID_PARAMETER, f"{name} must be between {lo} and {hi}")
    return value


def image_dict(image: Image, result: Result | None, with_job: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": image.id,
        "filename": image.filename,
        "status": image.status,
        "probability": result.probability if result else None,
        "label": result.label if result else None,
        # failed (could not be processed) and skipped (out of the model's scope) carry a reason
        "error": (
            {"code": image.error_code, "message": image.error_message}
            if image.status in (ImageStatus.FAILED, ImageStatus.SKIPPED)
            else None
        ),
        # DICOM input only (null otherwise): the source's UIDs, as the client sent them
        "study_instance_uid": image.study_instance_uid,
        "series_instance_uid": image.series_instance_uid,
        "sop_instance_uid": image.sop_instance_uid,
        "pacs_delivery": (
            {"status": image.pacs_delivery, "error_code": image.pacs_error_code}
            if image.pacs_delivery
            else None
        ),
    }
    if with_job:
        out.update(
            job_id=image.job_id,
            model_version=result.model_version if result else None,
            attempts=image.attempts,
            created_at=iso(image.created_at),
            finished_at=iso(image.finished_at),
        )
    return out


def images_with_results() -> Select[tuple[Image, Result]]:
    """Images joined to their result, if any: the base of every read of per-image results."""
    return select(Image, Result).outerjoin(Result, Result.image_id == Image.id)


def job_images(job_id: str) -> Select[tuple[Image, Result]]:
    """A job's images with their results, in submission order."""
    return images_with_results().where(Image.job_id == job_id).order_by(Image.position)


def image_page(
    session: Session, job_id: str, page: int, per_page: int, status: str | None
) -> tuple[list[dict[str, Any]], int]:
    query = job_images(job_id)
    count_query = select(func.count()).select_from(Image).where(Image.job_id == job_id)
    if status:
        query = query.where(Image.status == status)
        count_query = count_query.where(Image.status == status)
    total = session.scalar(count_query) or 0
    rows = session.execute(query.offset((page - 1) * per_page).limit(per_page)).all()
    return [image_dict(image, result) for image, result in rows], total


def job_studies(session: Session, job_id: str) -> list[dict[str, Any]]:
    """One row per DICOM study in the job, in order of first appearance: its images by
    outcome, and the study's answer, which is its most suspicious scored film's (lateral and
    other out-of-scope films are skipped, never scored, so they cannot decide it)."""
    rows = session.execute(
        select(Image.study_instance_uid, Image.status, Result.probability, Result.label)
        .outerjoin(Result, Result.image_id == Image.id)
        .where(Image.job_id == job_id, Image.study_instance_uid.is_not(None))
        .order_by(Image.position)
    ).all()
    studies: dict[str, dict[str, Any]] = {}
    for uid, status, probability, label in rows:
        study = studies.setdefault(
            uid,
            {
                "study_instance_uid": uid,
                "images": 0,
                "counts": {s.value: 0 for s in ImageStatus},
                "max_probability": None,
                "label": None,
            },
        )
        study["images"] += 1
        study["counts"][status] += 1
        if probability is not None and (
            study["max_probability"] is None or probability > study["max_probability"]
        ):
            study["max_probability"], study["label"] = probability, label
    return list(studies.values())
