"""``/v1/callback-secret``: the secret that signs the caller's job callbacks, and its rotation.

Invariant: a client reads and rotates only its own secret (admins too: theirs is their own
client's); it is made on first use, answered with ``Cache-Control: no-store`` and never
logged.
"""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from api.auth import authenticate, current_principal
from api.extensions import service
from shared.callbacks import (
    DEFAULT_TOLERANCE_S,
    EVENT,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    client_secret,
    rotate_secret,
)
from shared.models import CallbackSecret
from shared.summary import iso

bp = Blueprint("callbacks", __name__)
bp.before_request(authenticate)


def _answer(row: CallbackSecret) -> Response:
    response = jsonify(
        {
            "client": row.client,
            "secret": row.secret,
            "created_at": iso(row.created_at),
            "algorithm": "HMAC-SHA256",
            "signed": f'{TIMESTAMP_HEADER} + "." + body',
            "signature_header": SIGNATURE_HEADER,
            "event": EVENT,
            "tolerance_seconds": DEFAULT_TOLERANCE_S,
        }
    )
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.get("")
def get_secret() -> Response:
    with service.state.sessions.begin() as session:
        return _answer(client_secret(session, current_principal().client))


@bp.post("/rotate")
def rotate() -> Response:
    """A new secret: every callback signed from now on (retries included) uses it."""
    with service.state.sessions.begin() as session:
        return _answer(rotate_secret(session, current_principal().client))
