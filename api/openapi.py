"""The OpenAPI 3 description of the API, served at ``/openapi.json`` (and fuzzed in the tests)."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify

from api.extensions import service
from shared.models import ImageStatus, JobStatus

bp = Blueprint("openapi", __name__)

UUID_PARAM = {"type": "string", "format": "uuid"}
IMAGE_STATUSES = [s.value for s in ImageStatus]
JOB_STATUSES = [s.value for s in JobStatus]
IMAGE_STATUS_DESCRIPTION = (
    "queued or running, then exactly one terminal status: completed (probability and label), "
    "failed (error: the image could not be processed, e.g. corrupt_image, too_many_attempts) "
    "or skipped (error: a readable image out of the model's scope, code "
    "not_frontal_chest_xray: not a frontal chest radiograph; never scored)"
)


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def _json(ref: str, description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}},
    }


def build_spec(max_per_page: int) -> dict[str, Any]:
    nullable_string = {"type": ["string", "null"]}
    image = {
        "type": "object",
        "required": ["id", "filename", "status", "probability", "label", "error"],
        "properties": {
            "id": UUID_PARAM,
            "filename": {"type": "string"},
            "status": {
                "type": "string",
                "enum": IMAGE_STATUSES,
                "description": IMAGE_STATUS_DESCRIPTION,
            },
            "probability": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
            "label": {"type": ["string", "null"], "enum": ["covid", "non-covid", None]},
            "error": {
                "oneOf": [{"type": "null"}, {"$ref": "#/components/schemas/ErrorDetail"}],
                "description": "the reason, for failed and skipped images; null otherwise",
            },
        },
    }
    job = {
        "type": "object",
        "required": ["id", "status", "image_count", "counts", "progress", "images"],
        "properties": {
            "id": UUID_PARAM,
            "status": {
                "type": "string",
                "enum": JOB_STATUSES,
                "description": "derived from the image statuses: completed when every image is "
                "completed or skipped; failed when every image failed; completed_with_errors "
                "when some failed and the rest completed or skipped",
            },
            "client_ref": nullable_string,
            "model_version": {"type": "string"},
            "image_count": {"type": "integer"},
            "counts": {
                "type": "object",
                "description": "images per image status: " + ", ".join(IMAGE_STATUSES),
                "additionalProperties": {"type": "integer"},
            },
            "progress": {"type": "number"},
            "created_at": {"type": "string", "format": "date-time"},
            "started_at": nullable_string,
            "completed_at": nullable_string,
            "images": {"type": "array", "items": {"$ref": "#/components/schemas/Image"}},
            "pagination": {"type": "object"},
            "links": {"type": "object"},
        },
    }
    unauthorized = _error("missing, malformed or revoked API key")
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "cxr-screen",
            "version": "1",
            "description": "Bulk COVID-19 screening of chest X-rays. A screening aid, not a "
            'diagnosis. Every error is {"error": {"code", "message"}}.',
        },
        "security": [{"bearer": []}],
        "paths": {
            "/v1/jobs": {
                "post": {
                    "operationId": "createJob",
                    "summary": "Submit images (or zips of images) as one job",
                    "parameters": [
                        {
                            "name": "Idempotency-Key",
                            "in": "header",
                            "required": False,
                            "schema": {"type": "string", "minLength": 1, "maxLength": 200},
                        },
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "multipart/form-data": {
                                "schema": {
                                    "type": "object",
                                    "required": ["files"],
                                    "properties": {
                                        "files": {
                                            "type": "array",
                                            "items": {"type": "string", "format": "binary"},
                                        },
                                        "client_ref": {"type": "string", "maxLength": 500},
                                    },
                                }
                            }
                        },
                    },
                    "responses": {
                        "202": _json("Job", "accepted; the images are stored"),
                        "200": _json("Job", "a retry with a known Idempotency-Key"),
                        "400": _error("invalid request or archive"),
                        "401": unauthorized,
                        "413": _error("too many files or bytes"),
                        "415": _error("not multipart/form-data"),
                        "503": _error("model unavailable"),
                    },
                }
            },
            "/v1/jobs/{job_id}": {
                "get": {
                    "operationId": "getJob",
                    "parameters": [
                        {"name": "job_id", "in": "path", "required": True, "schema": UUID_PARAM},
                        {
                            "name": "page",
                            "in": "query",
                            "schema": {"type": "integer", "minimum": 1},
                        },
                        {
                            "name": "per_page",
                            "in": "query",
                            "schema": {"type": "integer", "minimum": 1, "maximum": max_per_page},
                        },
                        {
                            "name": "status",
                            "in": "query",
                            "schema": {"type": "string", "enum": IMAGE_STATUSES},
                        },
                    ],
                    "responses": {
                        "200": _json("Job", "the job, with one page of its images"),
                        "400": _error("invalid parameter"),
                        "401": unauthorized,
                        "404": _error("no such job for this client"),
                    },
                }
            },
            "/v1/jobs/{job_id}/results.csv": {
                "get": {
                    "operationId": "getJobResultsCsv",
                    "parameters": [
                        {"name": "job_id", "in": "path", "required": True, "schema": UUID_PARAM}
                    ],
                    "responses": {
                        "200": {
                            "description": "CSV, one row per image",
                            "content": {"text/csv": {"schema": {"type": "string"}}},
                        },
                        "401": unauthorized,
                        "404": _error("no such job for this client"),
                    },
                }
            },
            "/v1/images/{image_id}": {
                "get": {
                    "operationId": "getImage",
                    "parameters": [
                        {"name": "image_id", "in": "path", "required": True, "schema": UUID_PARAM}
                    ],
                    "responses": {
                        "200": _json("Image", "one image and its result"),
                        "401": unauthorized,
                        "404": _error("no such image for this client"),
                    },
                }
            },
            "/healthz": {
                "get": {
                    "operationId": "healthz",
                    "security": [],
                    "responses": {"200": {"description": "process alive"}},
                }
            },
            "/readyz": {
                "get": {
                    "operationId": "readyz",
                    "security": [],
                    "responses": {
                        "200": {"description": "ready"},
                        "503": {"description": "a dependency is down"},
                    },
                }
            },
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "ErrorDetail": {
                    "type": "object",
                    "required": ["code", "message"],
                    "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
                },
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {"error": {"$ref": "#/components/schemas/ErrorDetail"}},
                },
                "Image": image,
                "Job": job,
            },
        },
    }


@bp.get("/openapi.json")
def openapi() -> Response:
    return jsonify(build_spec(service.state.settings.max_per_page))
