"""The Celery application's configuration and the one way work is enqueued.

API and workers build the same Celery app from the settings; the API only *sends* tasks by
name and never imports the worker's task code (or TensorFlow).  Job state lives in our own
tables, so there is no result backend.  Chunks reach the classification queue through the fair
dispatcher (shared/dispatch.py), which sends them with the same task name; the PACS queue
(reports, pulls, heat maps, callbacks) is sent to directly.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Iterator

import redis
from celery import Celery
from kombu.exceptions import OperationalError as BrokerError
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from shared.db import utcnow
from shared.models import Chunk, ChunkStatus
from shared.settings import Settings

log = logging.getLogger(__name__)

CLASSIFY_TASK = "cxr.classify_chunk"
QUEUE = "cxr"
#: Work with the PACS (reports sent back, pulls of studies) goes through a queue of its own, so
#: that a slow or unreachable PACS never holds classification back (every worker consumes it
#: too: worker/celery_app.py).
DELIVER_TASK = "cxr.deliver_report"
PULL_TASK = "cxr.pull_job"
#: A job's signed callback (shared/callbacks.py) goes through the PACS queue too: it waits on
#: someone else's server as well.
CALLBACK_TASK = "cxr.deliver_callback"
PACS_QUEUE = "cxr-pacs"
#: Heat maps are rendered on demand, on the PACS queue too: a reader waiting for one is not
#: held behind a backlog of chunks.
HEATMAP_TASK = "cxr.render_heatmap"


def make_celery(settings: Settings, name: str = "cxr") -> Celery:
    app = Celery(name, broker=settings.redis_url)
    app.conf.update(
        task_default_queue=QUEUE,
        task_routes={
            DELIVER_TASK: {"queue": PACS_QUEUE},
            PULL_TASK: {"queue": PACS_QUEUE},
            HEATMAP_TASK: {"queue": PACS_QUEUE},
            CALLBACK_TASK: {"queue": PACS_QUEUE},
        },
        task_ignore_result=True,
        result_backend=None,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        # KiB of peak RSS; checked after each task, so a pool process is replaced between
        # chunks, never killed inside one (None: no limit)
        worker_max_memory_per_child=settings.worker_max_memory_mb * 1024 or None,
        # a pool child loads TensorFlow and the model before it reports up: allow for that
        worker_proc_alive_timeout=120,
        task_time_limit=settings.task_time_limit,
        task_soft_time_limit=max(settings.task_time_limit - 30, settings.task_time_limit // 2),
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout,
            # an unreachable Redis must fail an enqueue in seconds, not hang the request
            "socket_connect_timeout": 5,
            "socket_timeout": 30,
        },
        broker_connection_retry_on_startup=True,
        task_serializer="json",
        accept_content=["json"],
    )
    return app


def enqueue_chunks(
    celery: Celery, session_factory: sessionmaker[Session], chunk_ids: Iterable[str]
) -> int:
    """Send one task per chunk now, *after* the chunks were committed, and stamp
    ``enqueued_at``, bypassing the fair dispatcher: for chunks whose turn came already (the
    sweeper resends those whose message was lost).  New work goes through
    ``shared.dispatch.dispatch``.

    A chunk whose send fails keeps its old ``enqueued_at``; the sweeper tries it again.
    Returns the number of chunks sent.
    """
    sent: list[str] = []
    try:
        for chunk_id in chunk_ids:
            celery.send_task(CLASSIFY_TASK, args=[chunk_id], queue=QUEUE)
            sent.append(chunk_id)
    except Exception as exc:  # broker down: the rows are safe, the sweeper will send them
        log.warning(
            "enqueue failed after %d chunks (%s); the sweeper will retry",
            len(sent),
            type(exc).__name__,
        )
    if sent:
        try:
            with session_factory.begin() as session:
                session.execute(
                    update(Chunk)
                    .where(Chunk.id.in_(sent), Chunk.status == ChunkStatus.QUEUED)
                    .values(enqueued_at=utcnow())
                )
        except Exception as exc:  # the tasks are out; at worst the sweeper sends one again
            log.warning("could not stamp enqueued_at (%s)", type(exc).__name__)
    return len(sent)


def enqueue_deliveries(celery: Celery, image_ids: Iterable[str]) -> int:
    """Send one report-delivery task per image, *after* their ``pending`` was committed.

    A send that fails leaves the image pending with no attempt: the sweeper sends it after its
    grace period.  Returns the number sent.
    """
    sent = 0
    try:
        for image_id in image_ids:
            celery.send_task(DELIVER_TASK, args=[image_id], queue=PACS_QUEUE)
            sent += 1
    except Exception as exc:  # broker down: the rows are safe, the sweeper will send them
        log.warning(
            "enqueue of reports failed after %d (%s); the sweeper will retry",
            sent,
            type(exc).__name__,
        )
    return sent


def enqueue_pull(celery: Celery, job_id: str) -> bool:
    """Send a pull job's task, after its row was committed; False when the broker is away
    (the sweeper sends it again: a pending pull without progress is re-enqueued)."""
    try:
        celery.send_task(PULL_TASK, args=[job_id], queue=PACS_QUEUE)
    except Exception as exc:
        log.warning("enqueue of pull job %s failed (%s)", job_id, type(exc).__name__)
        return False
    return True


def enqueue_callbacks(celery: Celery, job_ids: Iterable[str]) -> int:
    """Send one callback-delivery task per job, *after* its callback was made due (committed).

    A send that fails leaves the callback due with no attempt: the sweeper sends it.  Returns
    the number sent."""
    sent = 0
    try:
        for job_id in job_ids:
            celery.send_task(CALLBACK_TASK, args=[job_id], queue=PACS_QUEUE)
            sent += 1
    except Exception as exc:  # broker down: the rows are safe, the sweeper will send them
        log.warning(
            "enqueue of callbacks failed after %d (%s); the sweeper will retry",
            sent,
            type(exc).__name__,
        )
    return sent


# --------------------------------------------------------------------------- heat maps
# A heat map is rendered on demand and its PNG kept in the blob store (content-addressed); Redis
# names it: ``cxr:heatmap:heatmaps/<image>-<model version>.png`` holds its blob key.  A pending
# marker beside it (SET NX, with a TTL) lets the API enqueue the rendering once per image while
# it is pending; the worker drops it when done.  A rendering that failed leaves a failure
# marker instead, for HEATMAP_FAILED_SECONDS: requests meanwhile are answered "unavailable"
# without a task.  Losing Redis loses only names: heat maps are rendered again.

#: A rendering not done by then (a lost message, a dead worker) is asked for again.
HEATMAP_PENDING_SECONDS = 120
#: After a failed rendering the next request may retry after this long (not at once: a client
#: polling a film that cannot be read any more must not enqueue a task at every poll).
HEATMAP_FAILED_SECONDS = 600
#: How long a heat map's name is kept (rendered again on the next request after that).
HEATMAP_KEEP_SECONDS = 30 * 24 * 3600
_HEATMAP = "cxr:heatmap:"
_PENDING = "cxr:heatmap-pending:"
_FAILED = "cxr:heatmap-failed:"


class QueueUnavailableError(RuntimeError):
    """Redis (the broker) cannot be reached; the message is the underlying error's type."""


class HeatmapFailedError(RuntimeError):
    """The heat map's last rendering failed; ``retry_in``: seconds until one may be tried
    again."""

    def __init__(self, retry_in: int) -> None:
        super().__init__(f"retry in {retry_in} s")
        self.retry_in = retry_in


def heatmap_name(image_id: str, model_version: str) -> str:
    return f"heatmaps/{image_id}-{model_version}.png"


_clients: dict[tuple[str, int], redis.Redis] = {}


def redis_client(url: str) -> redis.Redis:
    """A plain client of the broker's Redis, one per URL and process, that fails fast (no
    connection retries, short timeouts): for the checks and counters that must not hold a
    request for seconds while Redis is away (kombu's own connections retry for ~4 s)."""
    key = (url, os.getpid())
    client = _clients.get(key)
    if client is None:
        client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5)
        _clients[key] = client
    return client


@contextlib.contextmanager
def broker_redis(celery: Celery) -> Iterator[redis.Redis]:
    """The broker's Redis client, from the app's connection pool."""
    try:
        with celery.pool.acquire(block=True, timeout=5) as conn:
            yield conn.default_channel.client
    except (redis.RedisError, BrokerError, OSError) as exc:
        raise QueueUnavailableError(type(exc).__name__) from exc


def request_heatmap(celery: Celery, image_id: str, model_version: str) -> str | None:
    """The blob key of the image's heat map, or None after making sure it is being rendered
    (its task is sent at most once while the pending marker lives).  Raises
    HeatmapFailedError while a failed rendering's marker lives, QueueUnavailableError."""
    name = heatmap_name(image_id, model_version)
    with broker_redis(celery) as client:
        key = client.get(_HEATMAP + name)
        if key:
            return key.decode()
        failed_for = client.ttl(_FAILED + name)
        if failed_for > 0:
            raise HeatmapFailedError(failed_for)
        first = client.set(_PENDING + name, b"1", nx=True, ex=HEATMAP_PENDING_SECONDS)
    if first:
        try:
            celery.send_task(HEATMAP_TASK, args=[image_id, model_version], queue=PACS_QUEUE)
        except Exception as exc:
            with contextlib.suppress(QueueUnavailableError), broker_redis(celery) as client:
                client.delete(_PENDING + name)
            raise QueueUnavailableError(type(exc).__name__) from exc
    return None


def forget_heatmap(celery: Celery, image_id: str, model_version: str) -> None:
    """Drop a heat map's name (its blob is gone): the next request renders it again."""
    with broker_redis(celery) as client:
        client.delete(_HEATMAP + heatmap_name(image_id, model_version))


def heatmap_rendered(celery: Celery, image_id: str, model_version: str, blob_key: str) -> None:
    """Name the stored heat map and drop the pending marker."""
    name = heatmap_name(image_id, model_version)
    with broker_redis(celery) as client:
        client.set(_HEATMAP + name, blob_key.encode(), ex=HEATMAP_KEEP_SECONDS)
        client.delete(_PENDING + name)


def heatmap_failed(celery: Celery, image_id: str, model_version: str) -> None:
    """A rendering failed: requests are answered so (HeatmapFailedError) for
    HEATMAP_FAILED_SECONDS, then the next one tries again."""
    name = heatmap_name(image_id, model_version)
    with broker_redis(celery) as client:
        client.set(_FAILED + name, b"1", ex=HEATMAP_FAILED_SECONDS)
        client.delete(_PENDING + name)
