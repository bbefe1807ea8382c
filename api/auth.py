"""Bearer-key authentication for the ``/v1`` blueprints, and job ownership.

The web UI's session cookie (api/ui_sessions.py) stands in for the header when no header is
sent: for reads always, for writes only with the session's ``X-CSRF-Token``, so that another
site cannot make a signed-in browser submit or change anything.  Whatever the credentials (none
at all with ``CXR_AUTH_DISABLED``), a write whose ``Origin`` header names another site is
refused: a browser sends it on every cross-site POST, and clients that are not browsers send
none.
"""

from __future__ import annotations

from flask import g, request
from sqlalchemy import ColumnElement, true

from api import ui_sessions
from api.errors import APIError, ErrorCode
from api.extensions import service
from shared.auth import Principal, lookup
from shared.models import ANONYMOUS_CLIENT

ANONYMOUS = Principal(client=ANONYMOUS_CLIENT, is_admin=True)


def same_origin() -> bool:
    """Whether an unsafe request's ``Origin`` header, when there is one, is this site's own
    ``scheme://host``.  Behind a TLS proxy the scheme and host may be the ones it forwards
    (``X-Forwarded-Proto``/``-Host``): a page of another site cannot set those headers (nor
    any other) on a cross-site request without a CORS preflight, which is never granted."""
    origin = request.headers.get("Origin")
    if origin is None or request.method in ui_sessions.SAFE_METHODS:
        return True
    schemes = {request.scheme, _forwarded("X-Forwarded-Proto")} - {""}
    hosts = {request.host, _forwarded("X-Forwarded-Host")} - {""}
    own = {f"{scheme}://{host}".lower() for scheme in schemes for host in hosts}
    return origin.strip().lower() in own


def _forwarded(header: str) -> str:
    """The first (the client's side) value of a proxy's ``X-Forwarded-*`` header, or ""."""
    return request.headers.get(header, "").split(",")[0].strip()


def authenticate() -> None:
    """``before_request`` hook: sets ``g.principal``, or answers 401 (no valid credentials) or
    403 (a write from another site)."""
    if not same_origin():
        raise APIError(
            ErrorCode.CSRF_FAILED, f"a {request.method} from another site (Origin) is refused"
        )
    state = service.state
    if state.settings.auth_disabled:
        g.principal = ANONYMOUS
        return
    header = request.headers.get("Authorization", "")
    scheme, _, key = header.partition(" ")
    if not header:
        g.principal = _session_principal()
        return
    if scheme.lower() != "bearer" or not key.strip():
        raise APIError(ErrorCode.INVALID_API_KEY, "the Authorization header must be 'Bearer KEY'")
    with state.sessions() as session:
        principal = lookup(session, key.strip())
    if principal is None:
        raise APIError(ErrorCode.INVALID_API_KEY, "the API key is unknown or revoked")
    g.principal = principal


def _session_principal() -> Principal:
    if ui_sessions.COOKIE not in request.cookies:
        raise APIError(ErrorCode.MISSING_API_KEY, "send your key as 'Authorization: Bearer KEY'")
    session = ui_sessions.current()
    if session is None:
        raise APIError(
            ErrorCode.SESSION_EXPIRED, "the web session has expired or its key was revoked"
        )
    sent = request.headers.get(ui_sessions.CSRF_HEADER)
    if request.method not in ui_sessions.SAFE_METHODS and not ui_sessions.tokens_match(
        session.csrf_token, sent
    ):
        raise APIError(
            ErrorCode.CSRF_FAILED,
            f"a {request.method} with the session cookie needs the header "
            f"{ui_sessions.CSRF_HEADER} of the page that sends it",
        )
    return session.principal


def current_principal() -> Principal:
    return g.principal


def caller_may_read(client: ColumnElement[str]) -> ColumnElement[bool]:
    """The ownership rule, as SQL on a job's ``client`` column: a client reads its own jobs
    (and their images), an admin every job.  Whatever the caller may not read is "not found"."""
    principal = current_principal()
    return true() if principal.is_admin else client == principal.client
