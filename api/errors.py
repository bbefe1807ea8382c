"""One JSON error shape for the whole API, ``{"error": {"code": ..., "message": ...}}``, and one
catalogue of its codes.

Invariant: every error answer comes from :class:`ErrorCode`.  Each member is a stable ``code``
with its HTTP ``status`` and a one-line ``meaning``; :class:`APIError` takes a member and a
message, so no call site types a status, and the handlers below answer werkzeug's HTTP errors,
database outages and unexpected exceptions with members as well.  The OpenAPI description
(:mod:`api.openapi`) is generated from the catalogue, and a test checks that the README's table
equals it.  (The per-image codes of failed and skipped images, inside an accepted job, are
:mod:`shared.imaging`'s catalogue, not this one.)
"""

from __future__ import annotations

import logging
import traceback
from enum import StrEnum

from flask import Flask, Response, jsonify
from sqlalchemy.exc import OperationalError
from werkzeug.exceptions import HTTPException

from api.ui_sessions import SessionStoreUnavailableError
from shared.queue import HEATMAP_FAILED_SECONDS
from shared.storage import BlobStoreFullError, BlobStoreUnavailableError

log = logging.getLogger(__name__)


class ErrorCode(StrEnum):
    """The catalogue: each member is its ``code`` (a ``str``), with ``status`` and ``meaning``.

    The order is the README table's: authentication, submission, reads, then any request."""

    _value_: str
    status: int
    meaning: str

    def __new__(cls, code: str, status: int, meaning: str) -> ErrorCode:
        member = str.__new__(cls, code)
        member._value_ = code
        member.status = status
        member.meaning = meaning
        return member

    # authentication (every /v1 request)
    MISSING_API_KEY = (
        "missing_api_key",
        401,
        "no Authorization header was sent (nor a web UI session cookie)",
    )
    INVALID_API_KEY = (
        "invalid_api_key",
        401,
        "the Authorization header is not 'Bearer KEY', or the key is unknown or revoked",
    )
    SESSION_EXPIRED = (
        "session_expired",
        401,
        "the web UI session cookie is unknown or expired, or its key was revoked: sign in again",
    )
    CSRF_FAILED = (
        "csrf_failed",
        403,
        "a POST or DELETE with the web UI session cookie lacks the session's X-CSRF-Token, or "
        "any POST or DELETE comes with the Origin header of another site",
    )
    # submission: the whole request is refused
    UNSUPPORTED_MEDIA_TYPE = (
        "unsupported_media_type",
        415,
        "the submission is not multipart/form-data or a JSON pull request (POST /v1/jobs), "
        'or not multipart/related; type="application/dicom" (STOW-RS)',
    )
    BAD_REQUEST = "bad_request", 400, "the request body cannot be parsed (malformed multipart)"
    NO_FILES = "no_files", 400, "the submission holds no file in the field 'files'"
    INVALID_PARAMETER = (
        "invalid_parameter",
        400,
        "a query parameter, client_ref, Idempotency-Key or pull request field is malformed, "
        "out of range or not accepted",
    )
    INVALID_ZIP = "invalid_zip", 400, "a .zip file, or one of its entries, cannot be read"
    UNSAFE_ZIP_ENTRY = (
        "unsafe_zip_entry",
        400,
        "a zip entry escapes the archive (.., an absolute path) or is a symbolic link",
    )
    ENCRYPTED_ZIP_ENTRY = "encrypted_zip_entry", 400, "a zip entry is encrypted"
    NESTED_ZIP = "nested_zip", 400, "a zip entry is itself a zip"
    ZIP_BOMB = "zip_bomb", 400, "a zip entry expands more than CXR_MAX_ZIP_RATIO times"
    TOO_MANY_FILES = (
        "too_many_files",
        413,
        "more than CXR_MAX_FILES_PER_JOB files, zip entries included",
    )
    FILE_TOO_LARGE = "file_too_large", 413, "a file or zip entry is over CXR_MAX_FILE_BYTES"
    REQUEST_TOO_LARGE = (
        "request_too_large",
        413,
        "the request, zips expanded, is over CXR_MAX_REQUEST_BYTES or has too many parts",
    )
    MODEL_UNAVAILABLE = "model_unavailable", 503, "the model is not loaded; see /readyz"
    PACS_NOT_CONFIGURED = (
        "pacs_not_configured",
        501,
        "a pull from the PACS was asked of a server without CXR_DICOMWEB_URL",
    )
    INVALID_CALLBACK_URL = (
        "invalid_callback_url",
        400,
        "callback_url is not an http:// or https:// URL with a valid host, carries credentials, "
        "or is over 2000 characters",
    )
    CALLBACK_HOST_NOT_ALLOWED = (
        "callback_host_not_allowed",
        400,
        "callback_url points at a private, loopback, link-local or reserved address that "
        "CXR_CALLBACK_ALLOWED_HOSTS does not allow",
    )
    # backpressure: nothing of the submission is stored; retry after Retry-After seconds
    TOO_MANY_IMAGES_IN_FLIGHT = (
        "too_many_images_in_flight",
        429,
        "this client already has CXR_MAX_IMAGES_IN_FLIGHT (or its key's limit) images not yet "
        "finished; retry after Retry-After seconds",
    )
    TOO_MANY_SUBMISSIONS = (
        "too_many_submissions",
        429,
        "this client sent more than CXR_MAX_SUBMISSIONS_PER_MINUTE (or its key's limit) "
        "submissions this clock minute; retry after Retry-After seconds",
    )
    OVERLOADED = (
        "overloaded",
        503,
        "the service holds CXR_MAX_QUEUE_IMAGES unfinished images or more; retry after "
        "Retry-After seconds",
    )
    # reads
    JOB_NOT_FOUND = "job_not_found", 404, "no job with this id for this client"
    IMAGE_NOT_FOUND = "image_not_found", 404, "no image with this id for this client"
    IMAGE_UNREADABLE = (
        "image_unreadable",
        409,
        "the stored file cannot be shown as a picture (the image failed, or was skipped at "
        "submission with no film kept; see its error)",
    )
    IMAGE_NOT_SCORED = (
        "image_not_scored",
        409,
        "the image has no score from the model now served (failed, skipped, not yet scored or "
        "scored by an earlier model): it has no heat map",
    )
    HEATMAP_UNAVAILABLE = (
        "heatmap_unavailable",
        409,
        "the heat map's rendering failed (the stored film cannot be read, or the worker "
        f"failed); it is tried again on a request {HEATMAP_FAILED_SECONDS // 60} minutes later",
    )
    # any request
    NOT_FOUND = "not_found", 404, "no such path"
    METHOD_NOT_ALLOWED = "method_not_allowed", 405, "the path does not take this method"
    DATABASE_UNAVAILABLE = (
        "database_unavailable",
        503,
        "the database is unreachable; retry after Retry-After seconds",
    )
    DATABASE_FULL = (
        "database_full",
        503,
        "the database has no room left (its disk is full): nothing of the request was kept; "
        "retry after Retry-After seconds",
    )
    STORAGE_UNAVAILABLE = (
        "storage_unavailable",
        503,
        "the blob store (directory or S3) is unreachable; retry after Retry-After seconds",
    )
    STORAGE_FULL = (
        "storage_full",
        507,
        "the blob store has no room left (a full disk or quota): nothing of the request was "
        "kept; retry after Retry-After seconds",
    )
    QUEUE_UNAVAILABLE = (
        "queue_unavailable",
        503,
        "Redis, the task queue, is unreachable; retry after Retry-After seconds",
    )
    SESSION_STORE_UNAVAILABLE = (
        "session_store_unavailable",
        503,
        "Redis, which holds the web UI sessions, is unreachable; retry after Retry-After seconds",
    )
    INTERNAL_ERROR = "internal_error", 500, "an unexpected server error (logged)"

    @classmethod
    def for_http_status(cls, status: int) -> ErrorCode:
        """The member that answers a werkzeug HTTP error: the generic one for its status; any
        other status (none is raised today) answers as ``bad_request`` or ``internal_error``."""
        generic = HTTP_ERRORS.get(status)
        if generic is not None:
            return generic
        return cls.BAD_REQUEST if 400 <= status < 500 else cls.INTERNAL_ERROR


# The members werkzeug's own errors (routing, body parsing, size limits) answer with.
HTTP_ERRORS: dict[int, ErrorCode] = {
    code.status: code
    for code in (
        ErrorCode.BAD_REQUEST,
        ErrorCode.NOT_FOUND,
        ErrorCode.METHOD_NOT_ALLOWED,
        ErrorCode.REQUEST_TOO_LARGE,
        ErrorCode.UNSUPPORTED_MEDIA_TYPE,
    )
}


class APIError(Exception):
    """Raise anywhere in a request to answer with the standard error shape; the HTTP status is
    the catalogue's."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def status(self) -> int:
        return self.code.status


class RetryLaterError(APIError):
    """An :class:`APIError` answered with ``Retry-After: retry_after`` (seconds): a refusal
    that will not last (a quota, an overload)."""

    def __init__(self, code: ErrorCode, message: str, retry_after: int) -> None:
        super().__init__(code, message)
        self.retry_after = max(1, int(retry_after))


def error_response(code: ErrorCode, message: str) -> tuple[Response, int]:
    return jsonify({"error": {"code": code.value, "message": message}}), code.status


#: Seconds a client is asked to wait when a dependency (database, blob store) is away.
RETRY_AFTER_SECONDS = 5
#: ... and when the database or the blob store is full: room is made by an operator, not in
#: seconds, and a client retrying a large upload every 5 s would only add load.
FULL_RETRY_AFTER_SECONDS = 60


def retry_later(
    code: ErrorCode, what: str, seconds: int = RETRY_AFTER_SECONDS
) -> tuple[Response, int]:
    """A 503 (or 507) for a dependency that is away or full for now, with ``Retry-After``."""
    when = "shortly" if seconds <= RETRY_AFTER_SECONDS else f"in {seconds} s or later"
    response, status = error_response(code, f"{what}; retry {when}")
    response.headers["Retry-After"] = str(seconds)
    return response, status


#: SQLite's SQLITE_FULL ("database or disk is full"; the low byte of an extended code) and
#: PostgreSQL's disk_full SQLSTATE.
_SQLITE_FULL = 13
_PG_DISK_FULL = "53100"


def database_full(exc: OperationalError) -> bool:
    """Whether a database error says "no room left" rather than "unreachable"."""
    orig = exc.orig
    sqlite_code = getattr(orig, "sqlite_errorcode", None)
    if isinstance(sqlite_code, int) and sqlite_code & 0xFF == _SQLITE_FULL:
        return True
    return getattr(orig, "sqlstate", None) == _PG_DISK_FULL


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(APIError)
    def _api_error(exc: APIError) -> tuple[Response, int]:
        response, status = error_response(exc.code, exc.message)
        if status == 401:
            response.headers["WWW-Authenticate"] = 'Bearer realm="cxr-screen"'
        if isinstance(exc, RetryLaterError):
            response.headers["Retry-After"] = str(exc.retry_after)
        return response, status

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> tuple[Response, int]:
        code = ErrorCode.for_http_status(exc.code or 500)
        if code is ErrorCode.REQUEST_TOO_LARGE:
            limit = app.config.get("MAX_CONTENT_LENGTH")
            return error_response(
                code, f"the request is larger than {limit} bytes or has too many parts"
            )
        return error_response(code, exc.description or code.meaning)

    @app.errorhandler(OperationalError)
    def _database_down(exc: OperationalError) -> tuple[Response, int]:
        if database_full(exc):  # the transaction was rolled back: nothing of it was kept
            log.error("database full (%s)", type(exc.orig).__name__)
            return retry_later(
                ErrorCode.DATABASE_FULL, "the database is full", FULL_RETRY_AFTER_SECONDS
            )
        log.warning("database unavailable (%s)", type(exc.orig).__name__)
        return retry_later(ErrorCode.DATABASE_UNAVAILABLE, "the database is unavailable")

    @app.errorhandler(BlobStoreUnavailableError)
    def _storage_down(exc: BlobStoreUnavailableError) -> tuple[Response, int]:
        log.warning("blob store unavailable (%s)", type(exc).__name__)
        return retry_later(ErrorCode.STORAGE_UNAVAILABLE, "the image store is unavailable")

    @app.errorhandler(BlobStoreFullError)
    def _storage_full(exc: BlobStoreFullError) -> tuple[Response, int]:
        # raised before the job's commit: no row names the blobs stored so far
        log.error("blob store full (%s)", type(exc).__name__)
        return retry_later(
            ErrorCode.STORAGE_FULL, "the image store is full", FULL_RETRY_AFTER_SECONDS
        )

    @app.errorhandler(SessionStoreUnavailableError)
    def _sessions_down(exc: SessionStoreUnavailableError) -> tuple[Response, int]:
        log.warning("session store unavailable (%s)", exc)  # the redis error's type
        return retry_later(ErrorCode.SESSION_STORE_UNAVAILABLE, "the session store is unavailable")

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> tuple[Response, int]:
        # the frames say where, without the exception's message: it may hold a filename
        where = "".join(traceback.format_tb(exc.__traceback__))
        log.error("unhandled %s\n%s", type(exc).__name__, where)
        return error_response(ErrorCode.INTERNAL_ERROR, "an unexpected error occurred")
