"""``/v1/images/{id}``: one image's status and result."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify
from sqlalchemy import select

from api.auth import authenticate, current_principal
from api.errors import APIError, ErrorCode
from api.extensions import service
from api.queries import image_dict, images_with_results, parse_id
from shared.models import Image, Job

bp = Blueprint("images", __name__)
bp.before_request(authenticate)


@bp.get("/<image_id>")
def get_image(image_id: str) -> Response:
    with service.state.sessions() as session:
        row = session.execute(
            images_with_results().where(Image.id == parse_id(image_id, "image"))
        ).first()
        principal = current_principal()
        if row is not None and not principal.is_admin:
            owner = session.scalar(select(Job.client).where(Job.id == row[0].job_id))
            row = row if owner == principal.client else None
        if row is None:
            raise APIError(ErrorCode.IMAGE_NOT_FOUND, f"no image with id {image_id!r}")
        return jsonify(image_dict(row[0], row[1], with_job=True))
