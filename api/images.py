"""``/v1/images/{id}``: one image's status and result, its film as a PNG for the web UI, and
its heat map (where the model looked).

The film and the heat map are served back only to a client that may read the image (its job's
owner, or an admin), downscaled, as the pixels the worker decodes (no DICOM header goes out).
A heat map is rendered by a worker on the first request (202 until it is stored; the task is
sent once while it is pending) and served from the blob store after that; a rendering that
failed is answered 409 ``heatmap_unavailable`` for a while (shared/queue.py), not retried at
every poll.  Neither picture may be cached by the browser (``no-store``): a shared
workstation keeps no patient's pixels after its reader has signed out.
"""

from __future__ import annotations

import logging

import cv2
import numpy as np
from flask import Blueprint, Response, jsonify
from sqlalchemy.orm import Session

from api.auth import authenticate, caller_may_read
from api.errors import APIError, ErrorCode, retry_later
from api.extensions import service
from api.queries import image_dict, images_with_results, parse_id
from shared.imaging import ImageError, decode_grayscale
from shared.models import Image, ImageStatus, Job, Result
from shared.queue import (
    HeatmapFailedError,
    QueueUnavailableError,
    forget_heatmap,
    request_heatmap,
)
from shared.storage import BlobCorruptError, BlobNotFoundError

log = logging.getLogger(__name__)

bp = Blueprint("images", __name__)
bp.before_request(authenticate)

#: The long side of the film PNG, in pixels: enough to read beside a heat map, far less to send.
FILM_MAX_SIDE = 1024
#: Patients' pixels: never kept by the browser (nor any proxy), so no ETag either.
PICTURE_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}


def load_image(session: Session, image_id: str) -> tuple[Image, Result | None]:
    """The image and its result, if the caller may see it: 404 otherwise (also when it exists
    for another client: no hint that it does)."""
    query = images_with_results().join(Job, Job.id == Image.job_id)
    row = session.execute(
        query.where(Image.id == parse_id(image_id, "image"), caller_may_read(Job.client))
    ).first()
    if row is None:
        raise APIError(ErrorCode.IMAGE_NOT_FOUND, f"no image with id {image_id!r}")
    return row[0], row[1]


@bp.get("/<image_id>")
def get_image(image_id: str) -> Response:
    with service.state.sessions() as session:
        image, result = load_image(session, image_id)
        return jsonify(image_dict(image, result, with_job=True))


def film_png(data: bytes, max_pixels: int) -> bytes:
    """The stored file as an 8-bit grayscale PNG, its long side at most FILM_MAX_SIDE."""
    gray = decode_grayscale(data, max_pixels)
    scale = FILM_MAX_SIDE / max(gray.shape)
    if scale < 1:
        size = (max(1, round(gray.shape[1] * scale)), max(1, round(gray.shape[0] * scale)))
        gray = cv2.resize(gray, size, interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".png", np.clip(gray * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if not ok:
        raise ImageError("the film cannot be encoded as PNG")
    return buf.tobytes()


@bp.get("/<image_id>/film.png")
def get_film(image_id: str) -> Response:
    state = service.state
    with state.sessions() as session:
        image, _ = load_image(session, image_id)
        blob_key = image.blob_key
    try:
        png = film_png(state.blobs.get(blob_key), state.settings.max_image_pixels)
    except ImageError as exc:
        raise APIError(
            ErrorCode.IMAGE_UNREADABLE, f"the stored file cannot be shown ({exc.code})"
        ) from None
    except (BlobNotFoundError, BlobCorruptError) as exc:  # lost or damaged in the store
        log.warning("image %s: film not shown (%s)", image_id, type(exc).__name__)
        raise APIError(
            ErrorCode.IMAGE_UNREADABLE, "the stored file is missing or damaged"
        ) from None
    return Response(png, mimetype="image/png", headers=PICTURE_HEADERS)


#: Seconds a client is asked to wait while a heat map is rendered (a rendering takes ~0.2 s).
HEATMAP_RETRY_AFTER = 2


def _scoring_model(image: Image, result: Result | None) -> str:
    """The version of the model served now, which must be the one that scored the image: a
    heat map shows where that model looked (409 image_not_scored otherwise)."""
    model = service.state.model
    if model is None:
        raise APIError(ErrorCode.MODEL_UNAVAILABLE, "the model is not available; see /readyz")
    if image.status != ImageStatus.COMPLETED or result is None:
        raise APIError(
            ErrorCode.IMAGE_NOT_SCORED, f"the image is {image.status}: it has no score to explain"
        )
    if result.model_version != model.version:
        raise APIError(
            ErrorCode.IMAGE_NOT_SCORED,
            f"the image was scored by model {result.model_version}; heat maps come from the "
            f"model served now ({model.version})",
        )
    return model.version


def _stored_heatmap(image_id: str, version: str) -> bytes | None:
    """The heat map's PNG, or None while it is being rendered (asked for here if need be)."""
    state = service.state
    key = request_heatmap(state.celery, image_id, version)
    if key is None:
        return None
    try:
        return state.blobs.get(key)
    except (BlobNotFoundError, BlobCorruptError):  # the store lost it: render it again
        forget_heatmap(state.celery, image_id, version)
        request_heatmap(state.celery, image_id, version)
        return None


@bp.get("/<image_id>/heatmap.png")
def get_heatmap(image_id: str) -> Response | tuple[Response, int]:
    with service.state.sessions() as session:
        image, result = load_image(session, image_id)
        version = _scoring_model(image, result)
    try:
        png = _stored_heatmap(image.id, version)
    except QueueUnavailableError as exc:
        log.warning("heat map: the task queue is unavailable (%s)", exc)  # an exception type
        return retry_later(ErrorCode.QUEUE_UNAVAILABLE, "the task queue is unavailable")
    except HeatmapFailedError as exc:
        raise APIError(
            ErrorCode.HEATMAP_UNAVAILABLE,
            "the heat map could not be drawn (the stored film cannot be read, or the worker "
            f"failed); it may be tried again in {exc.retry_in} s",
        ) from None
    if png is None:
        pending = jsonify(
            {"image_id": image.id, "status": "pending", "retry_after": HEATMAP_RETRY_AFTER}
        )
        pending.headers.update(
            {"Retry-After": str(HEATMAP_RETRY_AFTER), "Cache-Control": "no-store"}
        )
        return pending, 202
    return Response(png, mimetype="image/png", headers=PICTURE_HEADERS)
