"""Fair dispatch: which queued chunk goes to the broker next, and when.

Invariant: the broker's classification queue (``cxr``) holds at most ``CXR_DISPATCH_DEPTH``
messages *waiting* for a worker (the ones workers hold are not counted: each is being
processed); every other queued chunk waits in the database, ``enqueued_at`` NULL, until a place
frees.  So one client's backlog is never in front of another client's new job by more than
those few messages.  The next chunk is chosen by

1. the job's ``priority`` (copied from the submitting API key): higher first, strictly;
2. round-robin across clients: the client whose last dispatched chunk is the oldest goes first
   (one never dispatched before all others; ties: the client waiting the longest);
3. within a client, its oldest job first, and that job's chunks in order.

A chunk is sent only after a committed conditional UPDATE stamped its ``enqueued_at`` (NULL ->
now), so two dispatchers can never send it twice; they are serialized by a short Redis lock
anyway, because the round-robin state (when each client was last served) lives in Redis too
(losing it to a Redis restart only resets the turns).  Dispatching pours: after each batch it
reads the queue's length again, and since Redis hands a pushed message at once to a worker
blocked waiting for one, the loop feeds every idle worker and stops when ``CXR_DISPATCH_DEPTH``
messages stay waiting.

Who dispatches: the API after each job's commit, the worker after each chunk it finishes (before
it takes the next message, so the queue refills at once), and the sweeper every sweep.
:func:`dispatch` never raises: with Redis or the database away the chunks stay in the database
for the next caller.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from celery import Celery
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from shared.db import as_utc, utcnow
from shared.models import TERMINAL_IMAGE, Chunk, ChunkStatus, Image, Job
from shared.queue import CLASSIFY_TASK, QUEUE, redis_client
from shared.settings import Settings

log = logging.getLogger(__name__)

LOCK = "cxr:dispatch:lock"
#: client -> the sequence number of its last dispatched chunk (round-robin turns)
LAST = "cxr:dispatch:last"
SEQ = "cxr:dispatch:seq"
#: A dispatcher that dies holding the lock frees it after this long.
LOCK_SECONDS = 10
#: How long a dispatcher waits for another to finish before leaving the work to it.
LOCK_WAIT_SECONDS = 2.0
#: Most chunks one call sends (it holds the lock meanwhile); the next caller goes on.
MAX_SENDS = 200

#: Chunks waiting for dispatch: queued, never sent (or handed back after a lost lease).
UNDISPATCHED = (Chunk.status == ChunkStatus.QUEUED) & Chunk.enqueued_at.is_(None)


@dataclass(frozen=True)
class Pick:
    chunk_id: str
    client: str


@dataclass(frozen=True)
class ClientQueue:
    """One client's undispatched chunks at one priority."""

    client: str
    priority: int
    oldest_job: Any  # created_at of its oldest job with an undispatched chunk


def client_queues(session: Session) -> list[ClientQueue]:
    rows = session.execute(
        select(Job.client, Job.priority, func.min(Job.created_at))
        .join(Chunk, Chunk.job_id == Job.id)
        .where(UNDISPATCHED)
        .group_by(Job.client, Job.priority)
    ).all()
    return [ClientQueue(client, priority, as_utc(oldest)) for client, priority, oldest in rows]


def _heads(session: Session, queue: ClientQueue, n: int) -> list[Pick]:
    """The client's next ``n`` chunks at this priority: oldest job first, its chunks in the
    order of their images (a job's chunks may share a creation time to the microsecond)."""
    first_image = (
        select(func.min(Image.position)).where(Image.chunk_id == Chunk.id).scalar_subquery()
    )
    ids = session.scalars(
        select(Chunk.id)
        .join(Job, Chunk.job_id == Job.id)
        .where(UNDISPATCHED, Job.client == queue.client, Job.priority == queue.priority)
        .order_by(Job.created_at, Job.id, first_image, Chunk.id)
        .limit(n)
    )
    return [Pick(chunk_id, queue.client) for chunk_id in ids]


def _round_robin(heads: Sequence[list[Pick]], n: int) -> list[Pick]:
    """Each queue's first chunk, then each one's second, ...: at most ``n``."""
    rounds = itertools.zip_longest(*heads)
    return [pick for row in rounds for pick in row if pick is not None][:n]


def pick_chunks(session: Session, slots: int, last: Mapping[str, int]) -> list[Pick]:
    """The next ``slots`` chunks to dispatch, in order.  ``last``: client -> when it was last
    served (a sequence number; absent: never), the round-robin turns.  Reads only."""
    queues = sorted(
        client_queues(session),
        key=lambda q: (-q.priority, last.get(q.client, 0), q.oldest_job, q.client),
    )
    picks: list[Pick] = []
    for _, same_priority in itertools.groupby(queues, key=lambda q: q.priority):
        need = slots - len(picks)
        if need <= 0:
            break
        # only the first `need` clients can be served now; each gives one chunk a round
        group = list(same_priority)[:need]
        per_client = 1 if len(group) >= need else need
        picks += _round_robin([_heads(session, q, per_client) for q in group], need)
    return picks


def _stamp(sessions: sessionmaker[Session], slots: int, last: Mapping[str, int]) -> list[Pick]:
    """Pick and claim: only the chunks this UPDATE stamped are ours to send."""
    with sessions.begin() as session:
        picks = pick_chunks(session, slots, last)
        if not picks:
            return []
        won = set(
            session.scalars(
                update(Chunk)
                .where(Chunk.id.in_([p.chunk_id for p in picks]), UNDISPATCHED)
                .values(enqueued_at=utcnow())
                .returning(Chunk.id)
                .execution_options(synchronize_session=False)
            )
        )
    return [p for p in picks if p.chunk_id in won]


def _unstamp(sessions: sessionmaker[Session], chunk_ids: Sequence[str]) -> None:
    """Hand back chunks whose send failed, for the next dispatcher (best effort: else the
    sweeper finds their message lost)."""
    with contextlib.suppress(Exception), sessions.begin() as session:
        session.execute(
            update(Chunk)
            .where(Chunk.id.in_(chunk_ids), Chunk.status == ChunkStatus.QUEUED)
            .values(enqueued_at=None)
        )


def _remember(client: Any, picks: Sequence[Pick]) -> None:
    """Record each client's turn (the last one served gets the highest number)."""
    if not picks:
        return
    top = int(client.incrby(SEQ, len(picks)))
    turns = {p.client: top - len(picks) + n + 1 for n, p in enumerate(picks)}
    client.hset(LAST, mapping=turns)


def _last_turns(client: Any) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in client.hgetall(LAST).items()}


def _send(celery: Celery, sessions: sessionmaker[Session], picks: Sequence[Pick]) -> list[Pick]:
    """Send each claimed chunk; on a failure hand the unsent back and raise."""
    for n, pick in enumerate(picks):
        try:
            celery.send_task(CLASSIFY_TASK, args=[pick.chunk_id], queue=QUEUE)
        except Exception:
            _unstamp(sessions, [p.chunk_id for p in picks[n:]])
            raise
    return list(picks)


def _pour(celery: Celery, sessions: sessionmaker[Session], depth: int, client: Any) -> int:
    sent = 0
    while sent < MAX_SENDS:
        room = min(depth - int(client.llen(QUEUE)), MAX_SENDS - sent)
        if room <= 0:
            break
        picks = _stamp(sessions, room, _last_turns(client))
        if not picks:
            break
        _remember(client, _send(celery, sessions, picks))
        sent += len(picks)
    return sent


def dispatch(celery: Celery, sessions: sessionmaker[Session], settings: Settings) -> int:
    """Send the next chunks, fairly, until ``settings.dispatch_depth`` messages wait in the
    broker; returns how many were sent.  Never raises."""
    try:
        client = redis_client(celery.conf.broker_url)  # fails fast while Redis is away
        lock = client.lock(LOCK, timeout=LOCK_SECONDS, blocking_timeout=LOCK_WAIT_SECONDS)
        if not lock.acquire():
            log.info("another dispatcher is busy; leaving the queue to it")
            return 0
        try:
            return _pour(celery, sessions, settings.dispatch_depth, client)
        finally:
            with contextlib.suppress(Exception):
                lock.release()
    except Exception as exc:  # the chunks stay in the database for the next dispatcher
        log.warning("dispatch failed (%s); the next one retries", type(exc).__name__)
        return 0


def undispatched(session: Session) -> tuple[int, int]:
    """(chunks waiting for dispatch, their images not yet terminal): the backlog that the
    broker's queue length no longer shows."""
    chunks = session.scalar(select(func.count()).select_from(Chunk).where(UNDISPATCHED)) or 0
    images = (
        session.scalar(
            select(func.count())
            .select_from(Image)
            .join(Chunk, Image.chunk_id == Chunk.id)
            .where(UNDISPATCHED, Image.status.not_in(TERMINAL_IMAGE))
        )
        or 0
    )
    return chunks, images
