"""A request id for every API request, bound for the logs and returned in ``X-Request-ID``.

Invariant: the id is a short safe token: the client's own ``X-Request-ID`` when it matches
``[A-Za-z0-9._-]{1,64}``, otherwise a fresh one (a header with a newline, quotes or 200
characters never reaches a log line).  A job or image id in the path is bound too, once it
parses as a UUID.  The ids of one request are cleared when it ends, so none leaks into the
next request a thread serves.
"""

from __future__ import annotations

import re
import uuid

from flask import Flask, Response, g, request

from shared import logs

HEADER = "X-Request-ID"
SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
#: Path parameters that name our own rows (a study UID in a DICOMweb path is not one of them).
PATH_IDS = ("job_id", "image_id")


def init_app(app: Flask) -> None:
    app.before_request(_bind_ids)
    app.after_request(_echo_request_id)
    app.teardown_request(_clear_ids)


def request_id_from(raw: str | None) -> str:
    if raw is not None and SAFE_REQUEST_ID.fullmatch(raw):
        return raw
    return uuid.uuid4().hex


def _path_ids() -> dict[str, str]:
    ids = {}
    for name in PATH_IDS:
        value = (request.view_args or {}).get(name)
        try:
            ids[name] = str(uuid.UUID(value))
        except (TypeError, ValueError, AttributeError):
            continue
    return ids


def _bind_ids() -> None:
    g.request_id = request_id_from(request.headers.get(HEADER))
    logs.clear()
    logs.bind(request_id=g.request_id, **_path_ids())


def _echo_request_id(response: Response) -> Response:
    request_id = g.get("request_id")
    if request_id:
        response.headers[HEADER] = request_id
    return response


def _clear_ids(_exc: BaseException | None) -> None:
    logs.clear()
