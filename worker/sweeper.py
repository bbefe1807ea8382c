"""The sweeper: finds chunks that fell through the cracks and enqueues them again.

* queued chunks never stamped ``enqueued_at`` (the send failed after the commit);
* running chunks whose lease expired (the worker died, timed out, or gave up retrying);
* queued chunks whose message vanished (Redis restarted without persistence): when the broker
  queue and its unacked set are both empty, any chunk still queued after the grace period
  cannot be waiting for a worker;
* queued chunks sent longer ago than the visibility timeout, whatever the broker says (their
  message was lost while the broker stayed busy).

Each state change is a conditional UPDATE, so a chunk claimed by a worker in the meantime is
left alone.  Re-enqueueing is always safe: processing is idempotent.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable

from celery import Celery
from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from shared.db import utcnow
from shared.models import Chunk, ChunkStatus
from shared.queue import QUEUE, enqueue_chunks
from shared.settings import Settings

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


def find_stranded(session: Session, settings: Settings, broker_idle: bool) -> list[str]:
    """Ids of chunks to send again; running chunks past their lease are reset to queued."""
    now = utcnow()
    grace = now - dt.timedelta(seconds=settings.enqueue_grace_seconds)
    lost = now - dt.timedelta(seconds=settings.visibility_timeout)
    expired = session.scalars(
        update(Chunk)
        .where(Chunk.status == ChunkStatus.RUNNING, Chunk.lease_expires_at < now)
        .values(status=ChunkStatus.QUEUED, enqueued_at=None, lease_expires_at=None)
        .returning(Chunk.id)
    ).all()
    queued = Chunk.status == ChunkStatus.QUEUED
    conditions = [
        queued & Chunk.enqueued_at.is_(None) & (Chunk.created_at < grace),
        queued & (Chunk.enqueued_at < lost),
    ]
    if broker_idle:
        conditions.append(queued & (Chunk.enqueued_at < grace))
    rows = session.scalars(
        select(Chunk.id).where(or_(*conditions)).order_by(Chunk.created_at).limit(SWEEP_LIMIT)
    ).all()
    return list(dict.fromkeys([*expired, *rows]))


def sweep(celery: Celery, session_factory: sessionmaker[Session], settings: Settings) -> int:
    """Re-enqueue stranded chunks; returns how many were sent."""
    idle = broker_is_idle(celery)
    with session_factory.begin() as session:
        ids = find_stranded(session, settings, idle)
    if not ids:
        return 0
    sent = enqueue_chunks(celery, session_factory, ids)
    log.warning("sweeper re-enqueued %d stranded chunk(s)", sent)
    return sent


def run_forever(settings: Settings, stop: Callable[[], bool] = lambda: False) -> None:
    """``cxr sweeper``: sweep every ``CXR_SWEEP_INTERVAL`` seconds until ``stop()``.

    Several sweepers may run at once (one per host): re-enqueueing is idempotent.
    """
    from shared.db import database
    from shared.queue import make_celery

    celery = make_celery(settings, name="cxr-sweeper")
    log.info("sweeper running every %.0f s", settings.sweep_interval)
    with database(settings.sqlalchemy_url) as sessions:
        while not stop():
            try:
                sweep(celery, sessions, settings)
            except Exception as exc:  # DB or Redis away: try again next round
                log.warning("sweep failed (%s)", type(exc).__name__)
            deadline = time.monotonic() + settings.sweep_interval
            while time.monotonic() < deadline and not stop():
                time.sleep(min(0.5, settings.sweep_interval))
