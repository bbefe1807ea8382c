"""Backpressure: whether a new submission may be accepted, decided before any of it is stored.

Invariant: a refused submission stores nothing (no blob, no row) and its answer says when to
retry (``Retry-After``, seconds) with a stable code: ``429 too_many_submissions`` past the
client's submissions per minute, ``503 overloaded`` while the whole service holds
``CXR_MAX_QUEUE_IMAGES`` unfinished images or more, ``429 too_many_images_in_flight`` while the
client holds its limit of unfinished images.  Nothing already accepted is affected: only new
submissions are checked (a replay of an accepted one, by its Idempotency-Key, is answered
before).  A key's own limits (api_keys columns) beat the settings'.

Counts are read at the door, before the body is: a submission accepted just under a limit may
take its client over it by its own size.  The per-minute counter is a Redis counter per client
per clock minute; every submission attempt counts; with Redis away it is not enforced (the rest
of the service does not need Redis to accept work either).
"""

from __future__ import annotations

import hashlib
import logging
import math
import time

from flask import request
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from api.errors import ErrorCode, RetryLaterError
from api.extensions import ServiceState
from shared.auth import Principal
from shared.models import Image, ImageStatus, Job
from shared.queue import redis_client

log = logging.getLogger(__name__)

WINDOW_SECONDS = 60
_RATE = "cxr:rate:"
#: A refused request's body is read (and thrown away) up to this size, so that the client sees
#: the answer rather than a connection reset; larger bodies are cut off.
DRAIN_BYTES = 32 * 1024 * 1024
UNFINISHED = Image.status.in_((ImageStatus.QUEUED, ImageStatus.RUNNING))


def unfinished_images(session: Session, client: str | None = None) -> int:
    """Images not yet terminal: the client's, or everyone's."""
    query = select(func.count()).select_from(Image).where(UNFINISHED)
    if client is not None:
        query = query.join(Job, Image.job_id == Job.id).where(Job.client == client)
    return session.scalar(query) or 0


def _submissions_this_minute(state: ServiceState, client: str) -> tuple[int, int] | None:
    """(attempts in this clock minute, this one included; seconds until it ends), or None
    when Redis cannot be asked."""
    now = time.time()
    window = int(now // WINDOW_SECONDS)
    name = hashlib.sha256(client.encode("utf-8", "surrogateescape")).hexdigest()[:32]
    key = f"{_RATE}{name}:{window}"
    try:
        pipe = redis_client(state.settings.redis_url).pipeline()
        pipe.incr(key)
        pipe.expire(key, 2 * WINDOW_SECONDS)
        count = int(pipe.execute()[0])
    except Exception as exc:
        log.warning("submission rate not checked: Redis unavailable (%s)", type(exc).__name__)
        return None
    return count, max(1, math.ceil((window + 1) * WINDOW_SECONDS - now))


def _refuse(code: ErrorCode, message: str, retry_after: int) -> RetryLaterError:
    _drain()
    log.info("submission refused: %s", code.value)
    return RetryLaterError(code, message, retry_after)


def _drain() -> None:
    """Read what the client sent, unstored, so that it reads our answer (a server that closes a
    socket with unread data resets the connection, and the answer may be lost with it)."""
    left = DRAIN_BYTES
    try:
        while left > 0 and (chunk := request.stream.read(min(left, 1 << 20))):
            left -= len(chunk)
    except Exception as exc:  # the client went away: nothing to answer anyway
        log.info("body not drained (%s)", type(exc).__name__)


def admit(state: ServiceState, principal: Principal) -> None:
    """Raise :class:`RetryLaterError` if this client's new submission must wait."""
    settings = state.settings
    per_minute = principal.max_submissions_per_minute or settings.max_submissions_per_minute
    rate = _submissions_this_minute(state, principal.client)
    if rate is not None and rate[0] > per_minute:
        raise _refuse(
            ErrorCode.TOO_MANY_SUBMISSIONS,
            f"more than {per_minute} submissions this minute",
            rate[1],
        )
    in_flight = principal.max_images_in_flight or settings.max_images_in_flight
    with state.sessions() as session:
        everyone = unfinished_images(session)
        # a client's share cannot exceed everyone's: count it only when it might matter
        mine = unfinished_images(session, principal.client) if everyone >= in_flight else everyone
    if everyone >= settings.max_queue_images:
        raise _refuse(
            ErrorCode.OVERLOADED,
            "the service has more work queued than it can finish in time",
            settings.quota_retry_after,
        )
    if mine >= in_flight:
        raise _refuse(
            ErrorCode.TOO_MANY_IMAGES_IN_FLIGHT,
            f"this client has {mine} images not yet finished (limit {in_flight})",
            settings.quota_retry_after,
        )
