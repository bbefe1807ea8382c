"""One JSON error shape for the whole API: ``{"error": {"code": ..., "message": ...}}``."""

from __future__ import annotations

import logging

from flask import Flask, Response, jsonify
from sqlalchemy.exc import OperationalError
from werkzeug.exceptions import HTTPException

log = logging.getLogger(__name__)

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    415: "unsupported_media_type",
    429: "too_many_requests",
}


class APIError(Exception):
    """Raise anywhere in a request to answer with the standard error shape."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def error_response(status: int, code: str, message: str) -> tuple[Response, int]:
    return jsonify({"error": {"code": code, "message": message}}), status


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(APIError)
    def _api_error(exc: APIError) -> tuple[Response, int]:
        response, status = error_response(exc.status, exc.code, exc.message)
        if status == 401:
            response.headers["WWW-Authenticate"] = 'Bearer realm="cxr-screen"'
        return response, status

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> tuple[Response, int]:
        status = exc.code or 500
        if status == 413:
            limit = app.config.get("MAX_CONTENT_LENGTH")
            return error_response(
                413,
                "request_too_large",
                f"the request is larger than {limit} bytes or has too many parts",
            )
        return error_response(status, _HTTP_CODES.get(status, "http_error"), exc.description or "")

    @app.errorhandler(OperationalError)
    def _database_down(exc: OperationalError) -> tuple[Response, int]:
        log.warning("database unavailable (%s)", type(exc.orig).__name__)
        response, status = error_response(
            503, "database_unavailable", "the database is unavailable; retry shortly"
        )
        response.headers["Retry-After"] = "5"
        return response, status

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> tuple[Response, int]:
        log.error("unhandled %s", type(exc).__name__, exc_info=exc)
        return error_response(500, "internal_error", "an unexpected error occurred")
