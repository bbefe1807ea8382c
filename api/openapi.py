"""The OpenAPI 3 description of the API, served at ``/openapi.json`` (and fuzzed in the tests)."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify

from api.errors import ErrorCode
from api.extensions import service
from api.pull import QUERY_KEYS
from api.ui_sessions import COOKIE, CSRF_HEADER
from shared.imaging import OUT_OF_SCOPE_CODES
from shared.models import CallbackStatus, ImageStatus, JobStatus, PacsDelivery

bp = Blueprint("openapi", __name__)

UUID_PARAM = {"type": "string", "format": "uuid"}
IMAGE_STATUSES = [s.value for s in ImageStatus]
JOB_STATUSES = [s.value for s in JobStatus]
PACS_STATUSES = [s.value for s in PacsDelivery]
DICOM_ONLY = "the source DICOM file's UID, as sent; null for PNG/JPEG input"
IMAGE_STATUS_DESCRIPTION = (
    "queued or running, then exactly one terminal status: completed (probability and label), "
    "failed (error: the image could not be processed, e.g. corrupt_image, too_many_attempts) "
    "or skipped (error: a readable image out of the model's scope, never scored; code one of "
    + ", ".join(sorted(OUT_OF_SCOPE_CODES))
    + ")"
)


# The error codes each operation may answer with, all from the catalogue (api/errors.py); the
# response statuses are the catalogue's, never typed here.
AUTH_ERRORS = (
    ErrorCode.MISSING_API_KEY,
    ErrorCode.INVALID_API_KEY,
    ErrorCode.SESSION_EXPIRED,
    ErrorCode.SESSION_STORE_UNAVAILABLE,
)
#: Refusals of a new submission (api/quotas.py), answered with Retry-After.
BACKPRESSURE_ERRORS = (
    ErrorCode.TOO_MANY_SUBMISSIONS,
    ErrorCode.TOO_MANY_IMAGES_IN_FLIGHT,
    ErrorCode.OVERLOADED,
)
CREATE_JOB_ERRORS = (
    *AUTH_ERRORS,
    ErrorCode.CSRF_FAILED,
    ErrorCode.UNSUPPORTED_MEDIA_TYPE,
    ErrorCode.BAD_REQUEST,
    ErrorCode.NO_FILES,
    ErrorCode.INVALID_PARAMETER,
    ErrorCode.INVALID_ZIP,
    ErrorCode.UNSAFE_ZIP_ENTRY,
    ErrorCode.ENCRYPTED_ZIP_ENTRY,
    ErrorCode.NESTED_ZIP,
    ErrorCode.ZIP_BOMB,
    ErrorCode.TOO_MANY_FILES,
    ErrorCode.FILE_TOO_LARGE,
    ErrorCode.REQUEST_TOO_LARGE,
    ErrorCode.MODEL_UNAVAILABLE,
    ErrorCode.PACS_NOT_CONFIGURED,
    ErrorCode.INVALID_CALLBACK_URL,
    ErrorCode.CALLBACK_HOST_NOT_ALLOWED,
    *BACKPRESSURE_ERRORS,
    ErrorCode.DATABASE_UNAVAILABLE,
    ErrorCode.DATABASE_FULL,
    ErrorCode.STORAGE_UNAVAILABLE,
    ErrorCode.STORAGE_FULL,
)
# a client's first GET makes its secret: a write
CALLBACK_SECRET_ERRORS = (*AUTH_ERRORS, ErrorCode.DATABASE_UNAVAILABLE, ErrorCode.DATABASE_FULL)
ROTATE_SECRET_ERRORS = (*CALLBACK_SECRET_ERRORS, ErrorCode.CSRF_FAILED)
STOW_ERRORS = (
    *AUTH_ERRORS,
    ErrorCode.CSRF_FAILED,
    ErrorCode.UNSUPPORTED_MEDIA_TYPE,
    ErrorCode.BAD_REQUEST,
    ErrorCode.NO_FILES,
    ErrorCode.TOO_MANY_FILES,
    ErrorCode.FILE_TOO_LARGE,
    ErrorCode.REQUEST_TOO_LARGE,
    ErrorCode.MODEL_UNAVAILABLE,
    *BACKPRESSURE_ERRORS,
    ErrorCode.DATABASE_UNAVAILABLE,
    ErrorCode.DATABASE_FULL,
    ErrorCode.STORAGE_UNAVAILABLE,
    ErrorCode.STORAGE_FULL,
)
GET_JOB_ERRORS = (
    *AUTH_ERRORS,
    ErrorCode.INVALID_PARAMETER,
    ErrorCode.JOB_NOT_FOUND,
    ErrorCode.DATABASE_UNAVAILABLE,
)
JOB_CSV_ERRORS = (*AUTH_ERRORS, ErrorCode.JOB_NOT_FOUND, ErrorCode.DATABASE_UNAVAILABLE)
GET_IMAGE_ERRORS = (*AUTH_ERRORS, ErrorCode.IMAGE_NOT_FOUND, ErrorCode.DATABASE_UNAVAILABLE)
GET_FILM_ERRORS = (*GET_IMAGE_ERRORS, ErrorCode.IMAGE_UNREADABLE, ErrorCode.STORAGE_UNAVAILABLE)
GET_HEATMAP_ERRORS = (
    *GET_IMAGE_ERRORS,
    ErrorCode.IMAGE_NOT_SCORED,
    ErrorCode.HEATMAP_UNAVAILABLE,
    ErrorCode.MODEL_UNAVAILABLE,
    ErrorCode.STORAGE_UNAVAILABLE,
    ErrorCode.QUEUE_UNAVAILABLE,
)
HEATMAP_PENDING = {
    "type": "object",
    "required": ["image_id", "status", "retry_after"],
    "properties": {
        "image_id": UUID_PARAM,
        "status": {"type": "string", "enum": ["pending"]},
        "retry_after": {"type": "integer", "description": "seconds; as the Retry-After header"},
    },
}

#: Blueprints whose routes this description leaves out on purpose: the web UI's HTML pages,
#: sign-in and static files (api/ui.py) are not part of the JSON API.
UNDESCRIBED_BLUEPRINTS = frozenset({"ui"})


#: 429 and 503 answers say when to come back (seconds).
RETRY_AFTER = {
    "Retry-After": {
        "description": "seconds to wait before retrying (sent with the codes that say so)",
        "schema": {"type": "integer", "minimum": 1},
    }
}


def _code_line(code: ErrorCode, with_status: bool = False) -> str:
    status = f" ({code.status})" if with_status else ""
    return f"- `{code.value}`{status}: {code.meaning}"


def error_catalogue_description() -> str:
    """Every request-level error code with its HTTP status and meaning, one per line."""
    return "\n".join(
        ["The error's stable code, one of:", *(_code_line(c, with_status=True) for c in ErrorCode)]
    )


def _errors(*codes: ErrorCode) -> dict[str, Any]:
    """An operation's error responses: one per catalogue status, listing that status's codes."""
    by_status: dict[int, list[ErrorCode]] = {}
    for code in codes:
        by_status.setdefault(code.status, []).append(code)
    return {
        str(status): {
            "description": "\n".join(_code_line(c) for c in members),
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
            **({"headers": RETRY_AFTER} if status in (429, 503) else {}),
        }
        for status, members in sorted(by_status.items())
    }


def _json(ref: str, description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}},
    }


CALLBACK_URL = {
    "type": "string",
    "format": "uri",
    "maxLength": 2000,
    "description": "http(s) URL that gets one signed POST of the job's summary when the job "
    "ends (headers X-CXR-Signature, X-CXR-Timestamp, X-CXR-Delivery, X-CXR-Attempt, "
    "X-CXR-Event; secret: GET /v1/callback-secret). No credentials in it; private, loopback "
    "and link-local hosts only where CXR_CALLBACK_ALLOWED_HOSTS allows them",
}
CALLBACK_STATE = {
    "oneOf": [
        {"type": "null"},
        {
            "type": "object",
            "required": ["url", "status", "attempts", "error_code", "http_status", "delivered_at"],
            "properties": {
                "url": {"type": "string"},
                "status": {"type": "string", "enum": [s.value for s in CallbackStatus]},
                "attempts": {"type": "integer", "minimum": 0},
                "error_code": {
                    "type": ["string", "null"],
                    "description": "why the last attempt failed: callback_timeout, "
                    "callback_connection_failed, callback_tls_failed, callback_dns_failed, "
                    "callback_http_error (408, 429, 5xx: retried), callback_rejected (3xx or "
                    "another 4xx: not retried), callback_host_not_allowed",
                },
                "http_status": {"type": ["integer", "null"]},
                "delivered_at": {"type": ["string", "null"], "format": "date-time"},
            },
        },
    ],
    "description": "the job's callback (null when created without callback_url): pending "
    "until the job ends and while it is retried, then delivered or failed",
}
CALLBACK_SECRET = {
    "type": "object",
    "required": ["client", "secret", "created_at", "algorithm"],
    "properties": {
        "client": {"type": "string"},
        "secret": {"type": "string"},
        "created_at": {"type": "string", "format": "date-time"},
        "algorithm": {"type": "string", "enum": ["HMAC-SHA256"]},
        "signed": {"type": "string"},
        "signature_header": {"type": "string"},
        "event": {"type": "string"},
        "tolerance_seconds": {"type": "integer"},
    },
}
PULL_REQUEST = {
    "type": "object",
    "required": ["dicomweb"],
    "description": "a job whose images a worker pulls from the PACS (CXR_DICOMWEB_URL)",
    "properties": {
        "dicomweb": {
            "type": "object",
            "properties": {
                "study_uids": {"type": "array", "items": {"type": "string"}, "maxItems": 1000},
                "query": {
                    "type": "object",
                    "description": "QIDO-RS study attributes: " + ", ".join(sorted(QUERY_KEYS)),
                    "additionalProperties": {"type": "string"},
                },
            },
        },
        "client_ref": {"type": "string", "maxLength": 500},
        "callback_url": CALLBACK_URL,
    },
}
STOW_ANSWER = {
    "description": "PS3.18 store answer (ReferencedSOPSequence, FailedSOPSequence): 200 all "
    "stored, 202 some failed, 409 none stored; Content-Location is the job",
    "content": {"application/dicom+json": {"schema": {"type": "object"}}},
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
            "study_instance_uid": {**nullable_string, "description": DICOM_ONLY},
            "series_instance_uid": {**nullable_string, "description": DICOM_ONLY},
            "sop_instance_uid": {**nullable_string, "description": DICOM_ONLY},
            "pacs_delivery": {
                "oneOf": [
                    {"type": "null"},
                    {
                        "type": "object",
                        "required": ["status", "error_code"],
                        "properties": {
                            "status": {"type": "string", "enum": PACS_STATUSES},
                            "error_code": nullable_string,
                        },
                    },
                ],
                "description": "the report sent back to the PACS (CXR_DICOMWEB_URL) for a "
                "scored DICOM image; null when there is nothing to send",
            },
        },
    }
    study = {
        "type": "object",
        "required": ["study_instance_uid", "images", "counts", "max_probability", "label"],
        "properties": {
            "study_instance_uid": {"type": "string"},
            "images": {"type": "integer", "minimum": 1},
            "counts": {
                "type": "object",
                "additionalProperties": {"type": "integer"},
                "description": "the study's images per image status",
            },
            "max_probability": {
                "type": ["number", "null"],
                "description": "the highest probability among its scored (frontal) films",
            },
            "label": {
                "type": ["string", "null"],
                "enum": ["covid", "non-covid", None],
                "description": "the label of that film: the study's answer",
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
            "source": {"type": "string", "enum": ["upload", "stow", "pull"]},
            "pull": {
                "type": ["object", "null"],
                "description": "pull jobs only: pending, done or failed (with error_code)",
            },
            "callback": CALLBACK_STATE,
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "cxr-screen",
            "version": "1",
            "description": "Bulk COVID-19 screening of chest X-rays. A screening aid, not a "
            'diagnosis. Every error is {"error": {"code", "message"}}.',
        },
        "security": [{"bearer": []}, {"session": []}],
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
                                        "callback_url": CALLBACK_URL,
                                    },
                                }
                            },
                            "application/json": {"schema": PULL_REQUEST},
                        },
                    },
                    "responses": {
                        "202": _json("Job", "accepted; the images are stored"),
                        "200": _json("Job", "a retry with a known Idempotency-Key"),
                        **_errors(*CREATE_JOB_ERRORS),
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
                            "description": "0: the job's summary alone (no image page), "
                            "the cheap way to wait for a job",
                            "schema": {"type": "integer", "minimum": 0, "maximum": max_per_page},
                        },
                        {
                            "name": "status",
                            "in": "query",
                            "schema": {"type": "string", "enum": IMAGE_STATUSES},
                        },
                    ],
                    "responses": {
                        "200": _json("Job", "the job, with one page of its images"),
                        **_errors(*GET_JOB_ERRORS),
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
                        **_errors(*JOB_CSV_ERRORS),
                    },
                }
            },
            "/v1/jobs/{job_id}/studies": {
                "get": {
                    "operationId": "getJobStudies",
                    "parameters": [
                        {"name": "job_id", "in": "path", "required": True, "schema": UUID_PARAM}
                    ],
                    "responses": {
                        "200": {
                            "description": "one row per DICOM study in the job",
                            "content": {
                                "application/json": {
                                    "schema": {
                                        "type": "object",
                                        "required": ["job_id", "studies"],
                                        "properties": {
                                            "job_id": UUID_PARAM,
                                            "studies": {
                                                "type": "array",
                                                "items": {"$ref": "#/components/schemas/Study"},
                                            },
                                        },
                                    }
                                }
                            },
                        },
                        **_errors(*JOB_CSV_ERRORS),
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
                        **_errors(*GET_IMAGE_ERRORS),
                    },
                }
            },
            "/v1/images/{image_id}/film.png": {
                "get": {
                    "operationId": "getImageFilm",
                    "summary": "The stored film as a grayscale PNG (long side at most 1024 px), "
                    "for the web UI",
                    "parameters": [
                        {"name": "image_id", "in": "path", "required": True, "schema": UUID_PARAM}
                    ],
                    "responses": {
                        "200": {
                            "description": "the film, decoded as the worker decodes it",
                            "content": {
                                "image/png": {"schema": {"type": "string", "format": "binary"}}
                            },
                        },
                        **_errors(*GET_FILM_ERRORS),
                    },
                }
            },
            "/v1/images/{image_id}/heatmap.png": {
                "get": {
                    "operationId": "getImageHeatmap",
                    "summary": "Where the model looked (Grad-CAM) drawn over the film, as a PNG "
                    "(long side at most 1024 px); rendered on the first request, then cached",
                    "parameters": [
                        {"name": "image_id", "in": "path", "required": True, "schema": UUID_PARAM}
                    ],
                    "responses": {
                        "200": {
                            "description": "the heat map over the film: a screening aid, not a "
                            "diagnosis",
                            "content": {
                                "image/png": {"schema": {"type": "string", "format": "binary"}}
                            },
                        },
                        "202": {
                            "description": "being rendered: ask again after Retry-After seconds",
                            "headers": {"Retry-After": {"schema": {"type": "integer"}}},
                            "content": {
                                "application/json": {
                                    "schema": {"$ref": "#/components/schemas/HeatmapPending"}
                                }
                            },
                        },
                        **_errors(*GET_HEATMAP_ERRORS),
                    },
                }
            },
            "/dicomweb/studies": {
                "post": {
                    "operationId": "stowInstances",
                    "summary": "DICOMweb STOW-RS: store instances, one job per request",
                    "requestBody": {
                        "required": True,
                        "content": {
                            'multipart/related; type="application/dicom"': {
                                "schema": {"type": "string", "format": "binary"}
                            }
                        },
                    },
                    "responses": {
                        "200": STOW_ANSWER,
                        "202": STOW_ANSWER,
                        "409": STOW_ANSWER,
                        **_errors(*STOW_ERRORS),
                    },
                }
            },
            "/v1/callback-secret": {
                "get": {
                    "operationId": "getCallbackSecret",
                    "summary": "The secret that signs this client's job callbacks (made on "
                    "first use)",
                    "responses": {
                        "200": _json("CallbackSecret", "the secret; never cache it"),
                        **_errors(*CALLBACK_SECRET_ERRORS),
                    },
                }
            },
            "/v1/callback-secret/rotate": {
                "post": {
                    "operationId": "rotateCallbackSecret",
                    "summary": "Replace the secret: every callback signed from now on, retries "
                    "included, uses the new one",
                    "responses": {
                        "200": _json("CallbackSecret", "the new secret"),
                        **_errors(*ROTATE_SECRET_ERRORS),
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
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "session": {
                    "type": "apiKey",
                    "in": "cookie",
                    "name": COOKIE,
                    "description": "the web UI's sign-in session (when no Authorization header "
                    f"is sent); POST needs its {CSRF_HEADER} header as well",
                },
            },
            "schemas": {
                "ErrorDetail": {
                    "type": "object",
                    "required": ["code", "message"],
                    "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
                },
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {
                        "error": {
                            "type": "object",
                            "required": ["code", "message"],
                            "properties": {
                                "code": {
                                    "type": "string",
                                    "enum": [c.value for c in ErrorCode],
                                    "description": error_catalogue_description(),
                                },
                                "message": {"type": "string"},
                            },
                        }
                    },
                },
                "Image": image,
                "Study": study,
                "Job": job,
                "CallbackSecret": CALLBACK_SECRET,
                "HeatmapPending": HEATMAP_PENDING,
            },
        },
    }


@bp.get("/openapi.json")
def openapi() -> Response:
    return jsonify(build_spec(service.state.settings.max_per_page))
