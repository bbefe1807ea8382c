"""The sweeper: finds chunks that fell through the cracks and enqueues them again.

Queued chunks that were never dispatched (``enqueued_at`` NULL) are normal: they wait in the
database for their turn (shared/dispatch.py).  Every sweep dispatches, like the API after a
commit and the worker after a chunk, so they move even when neither runs (the API's send failed
after the commit, Redis was away, every worker was idle).  Besides that, the sweeper handles:

* running chunks whose lease expired (the worker died, timed out, or gave up retrying): they go
  back to queued and undispatched, and are dispatched in their turn;
* dispatched chunks whose message vanished (Redis restarted without persistence): when the
  broker queue and its unacked set are both empty, a chunk still queued more than
  ``CXR_ENQUEUE_GRACE_SECONDS`` after it was dispatched cannot be waiting for a worker: it is
  sent again at once (its turn came already); and, whatever the queue holds, every dispatched
  chunk still queued as soon as the broker is seen to have lost its data (a key the sweeper
  keeps there is gone: :class:`BrokerEpoch`);
* dispatched chunks sent longer ago than the visibility timeout, whatever the broker says (their
  message was lost while the broker stayed busy): sent again at once too;
* report deliveries still ``pending`` with no attempt for longer than ``lease_seconds`` (since
  the image was scored, or since its last attempt, which every attempt stamps first): their
  message was never sent or was lost.  Only while the report queue is empty (else they may be
  waiting in it), or after the visibility timeout whatever the queue holds;
* pull jobs still ``pending`` with no attempt for as long, on the same terms;
* job callbacks: jobs that ended without their callback being made due (a worker died between
  its commit and its check), and due callbacks with no attempt in flight or scheduled for as
  long (worker/callbacks.py).

Each state change is a conditional UPDATE, so a chunk claimed by a worker in the meantime is
left alone.  Re-enqueueing is always safe: processing is idempotent.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from celery import Celery
from sqlalchemy import ColumnElement, func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from shared.db import utcnow
from shared.dispatch import dispatch
from shared.models import Chunk, ChunkStatus, Image, Job, PacsDelivery, PullStatus
from shared.queue import (
    PACS_QUEUE,
    QUEUE,
    broker_redis,
    enqueue_chunks,
    enqueue_deliveries,
    enqueue_pull,
)
from shared.settings import Settings
from worker.callbacks import sweep_callbacks

log = logging.getLogger(__name__)

SWEEP_LIMIT = 1000


def broker_is_idle(celery: Celery) -> bool:
    """True when the Redis queue holds no message and none is reserved by a worker."""
    try:
        with celery.connection_for_write() as conn:
            client = conn.default_channel.client
            return client.llen(QUEUE) == 0 and client.hlen("unacked") == 0
    except Exception as exc:
        log.warning("cannot inspect the broker (%s)", type(exc).__name__)
        return False


def pacs_queue_is_empty(celery: Celery) -> bool:
    """True when no report delivery or pull waits in the broker (False when it cannot be asked)."""
    try:
        with celery.connection_for_write() as conn:
            return conn.default_channel.client.llen(PACS_QUEUE) == 0
    except Exception as exc:
        log.warning("cannot inspect the broker (%s)", type(exc).__name__)
        return False


def _stale(last_activity: ColumnElement, settings: Settings, queue_empty: bool) -> ColumnElement:
    """No progress for ``lease_seconds`` (its message would have been taken by now), or, while
    the PACS queue holds messages (it may be waiting there), for the visibility timeout."""
    quiet_for = settings.lease_seconds if queue_empty else settings.visibility_timeout
    return last_activity < utcnow() - dt.timedelta(seconds=quiet_for)


def _stranded_ids(
    session: Session, id_column: Any, pending: ColumnElement, last_activity: Any, stale: Any
) -> list[str]:
    return list(
        session.scalars(
            select(id_column).where(pending, stale).order_by(last_activity).limit(SWEEP_LIMIT)
        )
    )


def find_stranded_deliveries(session: Session, settings: Settings, queue_empty: bool) -> list[str]:
    """Ids of images whose pending report delivery has made no progress for too long."""
    last_activity = func.coalesce(Image.pacs_attempted_at, Image.finished_at)
    pending = Image.pacs_delivery == PacsDelivery.PENDING
    stale = _stale(last_activity, settings, queue_empty)
    return _stranded_ids(session, Image.id, pending, last_activity, stale)


def find_stranded_pulls(session: Session, settings: Settings, queue_empty: bool) -> list[str]:
    """Ids of pull jobs still pending with no attempt for too long (each attempt stamps
    ``pull_attempted_at`` first, and no attempt outlives the task time limit)."""
    last_activity = func.coalesce(Job.pull_attempted_at, Job.created_at)
    pending = Job.pull_status == PullStatus.PENDING
    stale = _stale(last_activity, settings, queue_empty)
    return _stranded_ids(session, Job.id, pending, last_activity, stale)


def _sweep_pacs_work(
    celery: Celery,
    session_factory: sessionmaker[Session],
    settings: Settings,
    find: Callable[[Session, Settings, bool], list[str]],
    send: Callable[[Celery, list[str]], int],
    what: str,
) -> int:
    empty = pacs_queue_is_empty(celery)
    with session_factory() as session:
        ids = find(session, settings, empty)
    sent = send(celery, ids) if ids else 0
    if sent:
        log.warning("sweeper re-enqueued %d stranded %s", sent, what)
    return sent


def sweep_deliveries(
    celery: Celery, session_factory: sessionmaker[Session], settings: Settings
) -> int:
    """Re-enqueue stranded report deliveries; returns how many were sent."""
    return _sweep_pacs_work(
        celery,
        session_factory,
        settings,
        find_stranded_deliveries,
        enqueue_deliveries,
        "report delivery task(s)",
    )


def sweep_pulls(celery: Celery, session_factory: sessionmaker[Session], settings: Settings) -> int:
    """Re-enqueue stranded pull jobs; returns how many were sent."""

    def send(celery: Celery, ids: list[str]) -> int:
        return sum(enqueue_pull(celery, job_id) for job_id in ids)

    return _sweep_pacs_work(
        celery, session_factory, settings, find_stranded_pulls, send, "pull job(s)"
    )


#: A key the sweeper writes in the broker's Redis; its value changes only when Redis lost it.
EPOCH_KEY = "cxr:broker:epoch"


class BrokerEpoch:
    """Notices that the broker lost its data (Redis restarted without persistence, or was
    flushed): the key this sweeper saw last time is gone or holds another value.  Every
    dispatched chunk still queued then lost its message, and is sent again at once, rather
    than after the visibility timeout (the broker is rarely idle under load).  A false alarm
    (a restart with AOF that lost the key's last second) only sends a few chunks twice, which
    processing makes harmless."""

    def __init__(self) -> None:
        self.seen: bytes | None = None

    def wiped(self, celery: Celery) -> bool:
        try:
            with broker_redis(celery) as client:
                client.set(EPOCH_KEY, uuid.uuid4().hex, nx=True)
                now = client.get(EPOCH_KEY)
        except Exception as exc:  # the broker is away: nothing to tell yet
            log.warning("cannot read the broker's epoch (%s)", type(exc).__name__)
            return False
        changed = self.seen is not None and now != self.seen
        self.seen = now
        return changed


def stranded_conditions(
    settings: Settings, broker_idle: bool, now: dt.datetime, broker_wiped: bool = False
) -> tuple[ColumnElement[bool], ColumnElement[bool]]:
    """(running chunks past their lease, dispatched chunks whose message was lost): what the
    sweeper picks.  Undispatched chunks are neither: they wait for their turn."""
    grace = now - dt.timedelta(seconds=settings.enqueue_grace_seconds)
    lost = now - dt.timedelta(seconds=settings.visibility_timeout)
    expired = (Chunk.status == ChunkStatus.RUNNING) & (Chunk.lease_expires_at < now)
    queued = Chunk.status == ChunkStatus.QUEUED
    conditions = [queued & (Chunk.enqueued_at < lost)]
    if broker_idle:
        conditions.append(queued & (Chunk.enqueued_at < grace))
    if broker_wiped:  # every message sent before now is gone
        conditions.append(queued & Chunk.enqueued_at.is_not(None) & (Chunk.enqueued_at < now))
    return expired, or_(*conditions)


def count_stranded(session: Session, settings: Settings, broker_idle: bool) -> tuple[int, int]:
    """Read-only: (running chunks past their lease, dispatched chunks the next sweep sends
    again)."""
    expired, resend = stranded_conditions(settings, broker_idle, utcnow())
    count = select(func.count()).select_from(Chunk)
    return session.scalar(count.where(expired)) or 0, session.scalar(count.where(resend)) or 0


def find_stranded(
    session: Session, settings: Settings, broker_idle: bool, broker_wiped: bool = False
) -> list[str]:
    """Ids of dispatched chunks whose message was lost (to send again at once); running chunks
    past their lease are reset to queued and undispatched (the dispatcher sends them)."""
    expired_now, resend = stranded_conditions(settings, broker_idle, utcnow(), broker_wiped)
    session.execute(
        update(Chunk)
        .where(expired_now)
        .values(status=ChunkStatus.QUEUED, enqueued_at=None, lease_expires_at=None)
    )
    return list(
        session.scalars(
            select(Chunk.id).where(resend).order_by(Chunk.created_at).limit(SWEEP_LIMIT)
        ).all()
    )


def sweep(
    celery: Celery,
    session_factory: sessionmaker[Session],
    settings: Settings,
    epoch: BrokerEpoch | None = None,
) -> int:
    """Send again the chunks whose message was lost, dispatch the next chunks, then sweep
    report deliveries, pulls and callbacks; returns how many chunks were sent
    (:func:`sweep_deliveries` logs its own count).  ``epoch``, kept from one sweep to the next,
    notices a broker that lost its data."""
    wiped = epoch.wiped(celery) if epoch is not None else False
    if wiped:
        log.warning("the broker lost its data: sending every dispatched chunk again")
    idle = broker_is_idle(celery)
    with session_factory.begin() as session:
        ids = find_stranded(session, settings, idle, wiped)
    sent = enqueue_chunks(celery, session_factory, ids) if ids else 0
    if sent:
        log.warning("sweeper re-enqueued %d chunk(s) whose message was lost", sent)
    sent += dispatch(celery, session_factory, settings)
    sweep_deliveries(celery, session_factory, settings)
    sweep_pulls(celery, session_factory, settings)
    sweep_callbacks(celery, session_factory, settings, pacs_queue_is_empty(celery))
    return sent


def run_forever(settings: Settings, stop: Callable[[], bool] = lambda: False) -> None:
    """``cxr sweeper``: sweep every ``CXR_SWEEP_INTERVAL`` seconds until ``stop()``.

    Several sweepers may run at once (one per host): re-enqueueing is idempotent.
    """
    from shared.db import database
    from shared.queue import make_celery

    celery = make_celery(settings, name="cxr-sweeper")
    log.info("sweeper running every %.0f s", settings.sweep_interval)
    epoch = BrokerEpoch()
    with database(settings.sqlalchemy_url) as sessions:
        while not stop():
            try:
                sweep(celery, sessions, settings, epoch)
            except Exception as exc:  # DB or Redis away: try again next round
                log.warning("sweep failed (%s)", type(exc).__name__)
            deadline = time.monotonic() + settings.sweep_interval
            while time.monotonic() < deadline and not stop():
                time.sleep(min(0.5, settings.sweep_interval))
