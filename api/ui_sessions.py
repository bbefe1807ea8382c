"""The web UI's sign-in sessions, kept server-side in Redis.

Invariant: the browser holds only a random 256-bit session id, in an HttpOnly, Secure,
SameSite=Strict cookie.  Redis holds, under the sha256 of that id and for
``CXR_UI_SESSION_SECONDS``, the sha256 of the API key the session was opened with and the
session's CSRF token.  The key itself is never stored, rendered, put in a URL or a cookie, or
logged.  Every use re-reads the key's row, so revoking a key ends its sessions at the next
request.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass

import redis
from flask import Flask, Response, current_app, g, request
from sqlalchemy import select

from api.extensions import service
from shared.auth import Principal, hash_key, lookup, principal_of
from shared.models import ApiKey
from shared.settings import Settings

COOKIE = "cxr_session"
CSRF_HEADER = "X-CSRF-Token"
#: Methods that change nothing: a session cookie alone may make them.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
MAX_TOKEN = 100  # nothing longer was ever issued: refused without a look-up
_PREFIX = "cxr:ui:session:"
_EXTENSION = "cxr-ui-sessions"


class SessionStoreUnavailableError(RuntimeError):
    """Redis, which holds the sessions, cannot be reached (answered 503 with Retry-After)."""


@dataclass(frozen=True)
class UISession:
    sid: str
    csrf_token: str
    principal: Principal


def init_app(app: Flask, settings: Settings) -> None:
    # a client per app (not per request): its connection pool is shared by the requests
    app.extensions[_EXTENSION] = redis.Redis.from_url(
        settings.redis_url, socket_connect_timeout=2, socket_timeout=5
    )


def _redis() -> redis.Redis:
    return current_app.extensions[_EXTENSION]


def _entry(sid: str) -> str:
    # Redis never holds a usable session id: a copy of its keys opens no session
    return _PREFIX + hashlib.sha256(sid.encode("utf-8", "surrogateescape")).hexdigest()


@contextlib.contextmanager
def _store() -> Iterator[redis.Redis]:
    try:
        yield _redis()
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise SessionStoreUnavailableError(type(exc).__name__) from exc


def open_session(key: str) -> UISession | None:
    """A new session for an active key; None for an unknown or revoked one."""
    with service.state.sessions() as db:
        principal = lookup(db, key)
    if principal is None:
        return None
    sid, csrf_token = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    entry = json.dumps({"key_hash": hash_key(key), "csrf": csrf_token})
    with _store() as store:
        store.set(_entry(sid), entry, ex=service.state.settings.ui_session_seconds)
    return UISession(sid, csrf_token, principal)


def current() -> UISession | None:
    """This request's session (looked up once per request), or None."""
    if "ui_session" not in g:
        g.ui_session = _load(request.cookies.get(COOKIE, ""))
    return g.ui_session


def _load(sid: str) -> UISession | None:
    if not sid or len(sid) > MAX_TOKEN:
        return None
    with _store() as store:
        raw = store.get(_entry(sid))
    if raw is None:
        return None
    entry = json.loads(raw)
    principal = _active_principal(entry["key_hash"])
    if principal is None:  # the key was revoked: the session ends with it
        close(sid)
        return None
    return UISession(sid, entry["csrf"], principal)


def _active_principal(key_hash: str) -> Principal | None:
    with service.state.sessions() as db:
        row = db.scalar(
            select(ApiKey).where(ApiKey.key_hash == key_hash, ApiKey.revoked_at.is_(None))
        )
    return None if row is None else principal_of(row)  # with its priority and limits


def close(sid: str) -> None:
    if sid and len(sid) <= MAX_TOKEN:
        with _store() as store:
            store.delete(_entry(sid))


def tokens_match(expected: str, given: str | None) -> bool:
    """Constant-time comparison of a CSRF token with what the request sent."""
    if not expected or not given:
        return False
    return hmac.compare_digest(
        expected.encode("utf-8", "surrogateescape"), given.encode("utf-8", "surrogateescape")
    )


def set_cookie(response: Response, session: UISession) -> None:
    response.set_cookie(
        COOKIE,
        session.sid,
        max_age=service.state.settings.ui_session_seconds,
        path="/",
        secure=True,
        httponly=True,
        samesite="Strict",
    )


def clear_cookie(response: Response) -> None:
    response.delete_cookie(COOKIE, path="/", secure=True, httponly=True, samesite="Strict")
