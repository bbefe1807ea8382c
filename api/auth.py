"""Bearer-key authentication for the ``/v1`` blueprints, and job ownership."""

from __future__ import annotations

from flask import g, request

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
        raise APIError(ErrorCode.MISSING_API_KEY, "send your key as 'Authorization: Bearer KEY'")
    if scheme.lower() != "bearer" or not key.strip():
        raise APIError(ErrorCode.INVALID_API_KEY, "the Authorization header must be 'Bearer KEY'")
    with state.sessions() as session:
        principal = lookup(session, key.strip())
    if principal is None:
        raise APIError(ErrorCode.INVALID_API_KEY, "the API key is unknown or revoked")
    g.principal = principal


def current_principal() -> Principal:
    return g.principal
