"""Bearer-key authentication for the ``/v1`` blueprints, and job ownership.

The web UI's session cookie (api/ui_sessions.py) stands in for the header when no header is
sent: for reads always, for writes only with the session's ``X-CSRF-Token``, so that another
site cannot make a signed-in browser submit or change anything.
"""

from __future__ import annotations

from flask import g, request

from api import ui_sessions
from api.errors import APIError, ErrorCode
from api.extensions import service
from shared.auth import Principal, lookup
from shared.models import ANONYMOUS_CLIENT

ANONYMOUS = Principal(client=ANONYMOUS_CLIENT, is_admin=True)


def authenticate() -> None:
    """``before_request`` hook: sets ``g.principal`` or answers 401."""
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
