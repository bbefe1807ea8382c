"""Delivering a job's signed callback: one POST of the job summary to the client's URL, retried
with Celery's backoff until it is answered with a 2xx or ``CXR_CALLBACK_MAX_SECONDS`` have
passed since the job ended (checked again before each attempt, so a callback whose attempts
never recorded an outcome ends too).

Invariant: a callback leaves ``pending`` once, by a conditional UPDATE, for ``delivered`` or
``failed``, and a callback no longer pending is never sent again.  Each attempt is claimed
first by a conditional UPDATE that counts it and pushes ``callback_next_at`` past the task time
limit, so two executions (a redelivery, the sweeper's resend) never attempt at once.  A receiver
may still get one delivery twice when its answer was lost (a timeout after it acted): the
``X-CXR-Delivery`` id is the same on every attempt, to deduplicate on.

The name in the URL is resolved here, at each attempt, and the connection goes only to an
address the policy allows (shared/callbacks.py), pinned: TLS still verifies the host name, and
no proxy from the environment is used.  Logs name the job, never the URL or the secret.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import socket
import time
from dataclasses import dataclass
from typing import Any, NamedTuple

import requests
from celery import Celery
from celery.exceptions import SoftTimeLimitExceeded
from celery.utils.time import get_exponential_backoff_interval
from requests.adapters import HTTPAdapter
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker
from urllib3.exceptions import NewConnectionError

from shared.callbacks import (
    ATTEMPT_HEADER,
    DELIVERY_HEADER,
    EVENT,
    EVENT_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    WAITING,
    Address,
    CallbackUrlError,
    Resolver,
    Target,
    allow_list,
    allowed_addresses,
    client_secret,
    delivery_id,
    job_has_ended,
    mark_due,
    parse_url,
    sign,
)
from shared.db import as_utc, utcnow
from shared.models import CallbackStatus, Job
from shared.queue import enqueue_callbacks
from shared.settings import Settings
from shared.summary import job_summary
from worker.resources import per_process

log = logging.getLogger(__name__)

# Why a callback is still pending (retried) or failed: ``callback.error_code`` on the job.
# no answer in CXR_CALLBACK_TIMEOUT, or an attempt cut off by the task's soft time limit:
# retried; also the code of a callback whose CXR_CALLBACK_MAX_SECONDS ran out unrecorded
TIMEOUT = "callback_timeout"
CONNECTION_FAILED = "callback_connection_failed"  # refused, reset, unreachable: retried
TLS_FAILED = "callback_tls_failed"  # handshake or certificate: retried
DNS_FAILED = "callback_dns_failed"  # the name does not resolve: retried
HTTP_ERROR = "callback_http_error"  # 408, 429 or 5xx: retried
REJECTED = "callback_rejected"  # a 3xx or another 4xx: the receiver said no, not retried
INTERNAL_ERROR = "internal_error"  # a bug in the delivery: not retried
#: Answers worth another try besides 5xx: the receiver was too slow or too busy.
RETRIED_STATUSES = frozenset({408, 429})
#: At most this many of a name's addresses are tried in one attempt (connect failures only).
#: CXR_CALLBACK_TIMEOUT bounds each connect and each read of the answer, not the whole answer:
#: a receiver that trickles its headers out is cut off by the task's soft time limit, and that
#: attempt counts as a timeout like any other.
MAX_ADDRESSES = 2
#: Workers' clocks differ a little: an attempt scheduled for now is not early by this much.
CLOCK_SLACK = dt.timedelta(seconds=2)
SWEEP_LIMIT = 1000
USER_AGENT = "cxr-screen-callback/1"


class CallbackOutcome(NamedTuple):
    """Where the callback stands after :func:`deliver_callback` (``pending``, ``delivered``,
    ``failed``, or ``none`` for a job without one); ``retry_in``: seconds until the next
    attempt, when this one failed and another is due."""

    status: str
    retry_in: float | None = None


@dataclass(frozen=True)
class _Attempt:
    number: int
    url: str
    due_at: dt.datetime
    body: bytes
    secret: str


class _Result(NamedTuple):
    code: str | None  # None: delivered
    http_status: int | None = None
    retry: bool = False


class PinnedAdapter(HTTPAdapter):
    """Connects to the address in the request's URL (one the policy allowed) while TLS sends
    and verifies the callback's host name, carried on the request as ``tls_host_name``."""

    def build_connection_pool_key_attributes(
        self, request: requests.PreparedRequest, verify: Any, cert: Any = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        host_params, pool_kwargs = super().build_connection_pool_key_attributes(
            request, verify, cert
        )
        name = getattr(request, "tls_host_name", None)
        if host_params["scheme"] == "https" and name:
            pool_kwargs["server_hostname"] = name
            pool_kwargs["assert_hostname"] = name
        return host_params, pool_kwargs


def callback_session() -> requests.Session:
    """The HTTP client of callbacks: pinned connections, no redirects followed (callers pass
    ``allow_redirects=False``) and no proxy from the environment (it would connect anywhere)."""
    http = requests.Session()
    http.trust_env = False
    adapter = PinnedAdapter(max_retries=0)
    http.mount("http://", adapter)
    http.mount("https://", adapter)
    return http


callback_http = per_process(callback_session)


def payload(session: Session, job: Job) -> bytes:
    """The callback's body: the job's summary as ``GET /v1/jobs/{id}`` gives it, without the
    page of images and without the callback's own state (it is the same on every attempt)."""
    summary = job_summary(session, job)
    summary.pop("callback", None)
    return json.dumps(summary, separators=(",", ":")).encode("utf-8")


def _expire(session: Session, job_id: str, settings: Settings) -> bool:
    """Fail a callback that may be attempted now but whose CXR_CALLBACK_MAX_SECONDS have run
    out (attempts that never recorded an outcome: a worker killed in one, a lost message),
    keeping its last error's code (``callback_timeout`` when none was recorded)."""
    now = utcnow()
    expired = session.execute(
        update(Job)
        .where(
            Job.id == job_id,
            Job.callback_status == CallbackStatus.PENDING,
            Job.callback_due_at < now - dt.timedelta(seconds=settings.callback_max_seconds),
            Job.callback_next_at <= now + CLOCK_SLACK,
        )
        .values(
            callback_status=CallbackStatus.FAILED,
            callback_error_code=func.coalesce(Job.callback_error_code, TIMEOUT),
            callback_next_at=None,
        )
        .execution_options(synchronize_session=False)
    ).rowcount
    if expired:
        log.warning("job %s: callback failed: CXR_CALLBACK_MAX_SECONDS ran out", job_id)
    return bool(expired)


def _claim(session: Session, job_id: str, settings: Settings) -> _Attempt | None:
    """Count an attempt if one may start now (due, pending, none in flight or scheduled later,
    its bounded time not spent), pushing the next one past the task time limit; None
    otherwise."""
    if _expire(session, job_id, settings):
        return None
    now = utcnow()
    changed = session.execute(
        update(Job)
        .where(
            Job.id == job_id,
            Job.callback_status == CallbackStatus.PENDING,
            Job.callback_due_at.is_not(None),
            Job.callback_next_at <= now + CLOCK_SLACK,
        )
        .values(
            callback_attempts=Job.callback_attempts + 1,
            callback_next_at=now + dt.timedelta(seconds=settings.task_time_limit),
        )
        .execution_options(synchronize_session=False)
    ).rowcount
    if not changed:
        return None
    job = session.scalars(
        select(Job).where(Job.id == job_id).execution_options(populate_existing=True)
    ).one()
    return _Attempt(
        number=job.callback_attempts,
        url=job.callback_url or "",
        due_at=as_utc(job.callback_due_at),  # type: ignore[arg-type]
        body=payload(session, job),
        secret=client_secret(session, job.client).secret,
    )


def _headers(job_id: str, attempt: _Attempt, target: Target) -> dict[str, str]:
    stamp = str(int(time.time()))
    return {
        "Host": target.host_header,
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        EVENT_HEADER: EVENT,
        DELIVERY_HEADER: delivery_id(job_id),
        ATTEMPT_HEADER: str(attempt.number),
        TIMESTAMP_HEADER: stamp,
        SIGNATURE_HEADER: sign(attempt.secret, stamp, attempt.body),
    }


def _post(
    http: requests.Session, target: Target, address: Address, headers: dict, body: bytes, t: float
) -> _Result:
    request = requests.Request("POST", target.url_for(address), data=body, headers=headers)
    prepared = http.prepare_request(request)
    prepared.tls_host_name = target.host  # type: ignore[attr-defined]
    # stream: the answer's body is never read (a receiver cannot make us download anything)
    with http.send(prepared, timeout=(t, t), allow_redirects=False, stream=True) as response:
        status = response.status_code
    if 200 <= status < 300:
        return _Result(None, status)
    if status in RETRIED_STATUSES or status >= 500:
        return _Result(HTTP_ERROR, status, retry=True)
    return _Result(REJECTED, status)


def _send(
    http: requests.Session, job_id: str, attempt: _Attempt, settings: Settings, resolve: Resolver
) -> _Result:
    """One attempt: check the URL, resolve and check its host now, POST to an allowed address."""
    try:
        target = parse_url(attempt.url)
        allow = allow_list(settings.callback_allowed_hosts)
        addresses = allowed_addresses(target, allow, resolve)
    except CallbackUrlError as exc:
        return _Result(exc.code)
    except (OSError, UnicodeError):  # socket.gaierror: the name does not resolve (now)
        return _Result(DNS_FAILED, retry=True)
    headers = _headers(job_id, attempt, target)
    failed = _Result(CONNECTION_FAILED, retry=True)
    for address in addresses[:MAX_ADDRESSES]:
        try:
            return _post(
                http, target, address, headers, attempt.body, settings.callback_attempt_timeout
            )
        except requests.exceptions.RequestException as exc:
            failed, next_address = _failure(exc)
            if not next_address:
                break
    return failed


def _never_connected(exc: requests.exceptions.ConnectionError) -> bool:
    """A new connection that failed (refused, unreachable): nothing was sent.  requests wraps
    urllib3's NewConnectionError in a MaxRetryError; a connection reset or closed after the
    request went out is a ProtocolError instead."""
    cause = exc.args[0] if exc.args else None
    return isinstance(getattr(cause, "reason", cause), NewConnectionError)


def _failure(exc: requests.exceptions.RequestException) -> tuple[_Result, bool]:
    """What a failed POST counts as, and whether the name's next address may be tried: only
    when this one was never connected to.  Once the request may have gone out the receiver may
    have acted on it, so the attempt ends there (and is retried later, as a whole)."""
    if isinstance(exc, requests.exceptions.SSLError):
        return _Result(TLS_FAILED, retry=True), False
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return _Result(TIMEOUT, retry=True), True
    if isinstance(exc, requests.exceptions.ConnectionError):
        return _Result(CONNECTION_FAILED, retry=True), _never_connected(exc)
    if isinstance(exc, requests.exceptions.Timeout):  # sent, no answer in time
        return _Result(TIMEOUT, retry=True), False
    return _Result(CONNECTION_FAILED, retry=True), False


def next_wait(attempt: int, due_at: dt.datetime, settings: Settings) -> float | None:
    """Seconds until attempt ``attempt + 1``: Celery's exponential backoff with full jitter
    (capped by ``CXR_RETRY_BACKOFF_MAX``), never past ``CXR_CALLBACK_MAX_SECONDS`` after the
    job ended; None once that time is spent."""
    left = (due_at + dt.timedelta(seconds=settings.callback_max_seconds) - utcnow()).total_seconds()
    if left <= 0:
        return None
    wait = get_exponential_backoff_interval(
        factor=1, retries=attempt - 1, maximum=settings.retry_backoff_max, full_jitter=True
    )
    return min(float(wait), left)


def _state(sessions: sessionmaker[Session], job_id: str) -> str:
    with sessions() as session:
        state = session.scalar(select(Job.callback_status).where(Job.id == job_id))
    return state or "none"


def _end(sessions: sessionmaker[Session], job_id: str, **values: Any) -> bool:
    """Update a pending callback (ending it or scheduling its next attempt); False when it was
    no longer pending."""
    with sessions.begin() as session:
        return bool(
            session.execute(
                update(Job)
                .where(Job.id == job_id, Job.callback_status == CallbackStatus.PENDING)
                .values(**values)
                .execution_options(synchronize_session=False)
            ).rowcount
        )


def _record(
    sessions: sessionmaker[Session],
    job_id: str,
    attempt: _Attempt,
    result: _Result,
    settings: Settings,
) -> CallbackOutcome:
    now = utcnow()
    seen = {"callback_error_code": result.code, "callback_http_status": result.http_status}
    if result.code is None:
        delivered = {"callback_delivered_at": now, "callback_next_at": None}
        if _end(sessions, job_id, callback_status=CallbackStatus.DELIVERED, **seen, **delivered):
            log.info("job %s: callback delivered (attempt %d)", job_id, attempt.number)
        return CallbackOutcome(_state(sessions, job_id))
    wait = next_wait(attempt.number, attempt.due_at, settings) if result.retry else None
    if wait is None:
        if _end(
            sessions, job_id, callback_status=CallbackStatus.FAILED, **seen, callback_next_at=None
        ):
            log.warning(
                "job %s: callback failed (%s) after %d attempt(s)",
                job_id,
                result.code,
                attempt.number,
            )
        return CallbackOutcome(_state(sessions, job_id))
    if not _end(sessions, job_id, callback_next_at=now + dt.timedelta(seconds=wait), **seen):
        return CallbackOutcome(_state(sessions, job_id))
    log.info(
        "job %s: callback attempt %d: %s, retry in %.1f s",
        job_id,
        attempt.number,
        result.code,
        wait,
    )
    return CallbackOutcome(CallbackStatus.PENDING, wait)


def deliver_callback(
    job_id: str,
    sessions: sessionmaker[Session],
    settings: Settings,
    http: requests.Session,
    resolve: Resolver = socket.getaddrinfo,
) -> CallbackOutcome:
    """Make one attempt at the job's callback, if one is due now (else change nothing), and
    record what came of it.  ``http`` is a :func:`callback_session`; ``resolve`` looks names
    up (``socket.getaddrinfo``).  Raises only database errors."""
    with sessions.begin() as session:
        attempt = _claim(session, job_id, settings)
    if attempt is None:
        return CallbackOutcome(_state(sessions, job_id))
    try:
        result = _send(http, job_id, attempt, settings, resolve)
    except SoftTimeLimitExceeded:  # a receiver that never finishes its answer: a timeout
        result = _Result(TIMEOUT, retry=True)
    return _record(sessions, job_id, attempt, result, settings)


def fail_callback(sessions: sessionmaker[Session], job_id: str, code: str) -> bool:
    """Pending -> failed with ``code`` (the task hit a bug: retrying it would not help)."""
    return _end(
        sessions,
        job_id,
        callback_status=CallbackStatus.FAILED,
        callback_error_code=code,
        callback_next_at=None,
    )


# --------------------------------------------------------------------------------- sweeper


def find_stranded_callbacks(session: Session, settings: Settings, queue_empty: bool) -> list[str]:
    """Jobs whose due callback has had no attempt in flight or scheduled for too long: its
    message was never sent or was lost.  ``lease_seconds`` past its next attempt's time while
    the PACS queue is empty (else it may be waiting there), the visibility timeout otherwise."""
    quiet_for = settings.lease_seconds if queue_empty else settings.visibility_timeout
    stale = Job.callback_next_at < utcnow() - dt.timedelta(seconds=quiet_for)
    return list(
        session.scalars(
            select(Job.id)
            .where(
                Job.callback_status == CallbackStatus.PENDING,
                Job.callback_due_at.is_not(None),
                stale,
            )
            .order_by(Job.callback_next_at)
            .limit(SWEEP_LIMIT)
        )
    )


def sweep_callbacks(
    celery: Celery, sessions: sessionmaker[Session], settings: Settings, queue_empty: bool
) -> int:
    """Make due the callbacks of jobs that ended unnoticed (a worker died between its commit and
    its check), resend stranded ones; returns how many tasks were sent."""
    with sessions() as session:
        ended = session.scalars(select(Job.id).where(WAITING, job_has_ended()).limit(SWEEP_LIMIT))
        ended = list(ended)
        stranded = find_stranded_callbacks(session, settings, queue_empty)
    due: list[str] = []
    for job_id in ended:
        with sessions.begin() as session:
            if mark_due(session, job_id):
                due.append(job_id)
    sent = enqueue_callbacks(celery, [*due, *stranded]) if due or stranded else 0
    if sent:
        log.warning("sweeper enqueued %d callback(s) (%d newly due)", sent, len(due))
    return sent
