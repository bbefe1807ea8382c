"""Celery tasks.  Arguments are ids only: no patient data travels through Redis."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable

from celery import Task
from celery.exceptions import SoftTimeLimitExceeded
from celery.utils.time import get_exponential_backoff_interval
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from shared.callbacks import callback_if_ended
from shared.dicomweb import PacsError, PacsUnavailableError
from shared.dispatch import dispatch
from shared.models import PullStatus
from shared.queue import (
    CALLBACK_TASK,
    CLASSIFY_TASK,
    DELIVER_TASK,
    HEATMAP_TASK,
    PULL_TASK,
    enqueue_deliveries,
    enqueue_pull,
    heatmap_failed,
    heatmap_rendered,
)
from shared.settings import Settings, get_settings
from worker.callbacks import INTERNAL_ERROR as CALLBACK_BUG
from worker.callbacks import callback_http, deliver_callback, fail_callback
from worker.celery_app import app
from worker.delivery import INTERNAL_ERROR, deliver, fail, give_up
from worker.heatmaps import render_heatmap
from worker.metrics import record_chunk
from worker.processing import process_chunk, release
from worker.pull import end_pull, pull
from worker.resources import blobs, classifier, model_info, pacs, sessions

log = logging.getLogger(__name__)

#: Transient failures (database, storage): the chunk is retried with exponential backoff.
TRANSIENT = (OperationalError, InterfaceError, OSError)


def is_transient(exc: BaseException) -> bool:
    """Connection-level database errors and storage I/O: worth a retry.  Integrity and
    programming errors are bugs: retrying them dozens of times would only hide them."""
    if isinstance(exc, TRANSIENT):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


MAX_RETRIES = 8
#: A delivery retried this many times (the PACS or the database unreachable) gives up: with
#: factor 2 and full jitter, about 3 minutes of waiting at the default CXR_RETRY_BACKOFF_MAX
#: of 60 s (raise that to ride out longer PACS outages).
DELIVERY_MAX_RETRIES = 10


# acks_late and reject_on_worker_lost come from the app's config (shared/queue.py)
@app.task(name=CLASSIFY_TASK, bind=True)
def classify_chunk(self: Task, chunk_id: str) -> None:
    try:
        _classify_chunk(self, chunk_id)
    finally:  # however it ended, refill the queue before this worker takes its next message
        dispatch(app, sessions(), get_settings())


def _classify_chunk(self: Task, chunk_id: str) -> None:
    settings = get_settings()
    started = time.time()
    try:
        outcome = process_chunk(
            chunk_id,
            sessions(),
            blobs(),
            classifier,
            settings,
            send_reports=functools.partial(enqueue_deliveries, app),
        )
    except (*TRANSIENT, DBAPIError) as exc:
        if not is_transient(exc):
            log.error("chunk %s: %s is not transient: not retried", chunk_id, type(exc).__name__)
            raise
        # Not an interruption: give the images back, then retry.  Once the retries are spent
        # the chunk's lease runs out and the sweeper sends it again.
        release(sessions(), chunk_id)
        log.warning(
            "chunk %s: transient %s, retry %d", chunk_id, type(exc).__name__, self.request.retries
        )
        raise self.retry(
            exc=exc,
            countdown=get_exponential_backoff_interval(
                factor=1,
                retries=self.request.retries,
                maximum=settings.retry_backoff_max,
                full_jitter=True,
            ),
            max_retries=MAX_RETRIES,
        ) from exc
    callback_if_ended(app, sessions(), chunk_id=chunk_id)  # the job's last chunk: its callback
    record_chunk(sessions(), chunk_id, outcome, started)
    log.info(
        "chunk %s: %d completed, %d failed, %d skipped (out of scope), %d already done, "
        "%d report(s) for the PACS",
        chunk_id,
        outcome.completed,
        outcome.failed,
        outcome.out_of_scope,
        outcome.already_done,
        outcome.reports_pending,
    )


#: The PACS unreachable, or too slow for the task's soft time limit: retried, then given up.
PACS_TRANSIENT = (PacsUnavailableError, SoftTimeLimitExceeded)


def _retry_pacs_work(
    task: Task, what: str, exc: Exception, settings: Settings, spent: Callable[[], None]
) -> None:
    """Retry with Celery's backoff and full jitter; once the retries are spent, ``spent()``
    records the outcome (or re-raises)."""
    retries = task.request.retries
    if retries >= DELIVERY_MAX_RETRIES:
        spent()
        return
    log.warning("%s: transient %s, retry %d", what, type(exc).__name__, retries)
    raise task.retry(
        exc=exc,
        countdown=get_exponential_backoff_interval(
            factor=2, retries=retries, maximum=settings.retry_backoff_max, full_jitter=True
        ),
        max_retries=DELIVERY_MAX_RETRIES,
    ) from exc


def _retry_delivery(task: Task, image_id: str, exc: Exception, settings: Settings) -> None:
    """Once the retries are spent, an unreachable PACS fails the delivery
    (``pacs_unreachable``), an unreachable database leaves it pending for the sweeper (it
    cannot be written anyway)."""

    def spent() -> None:
        if isinstance(exc, PACS_TRANSIENT):
            give_up(image_id, sessions())
            return
        log.error("image %s: report still pending after %d retries", image_id, DELIVERY_MAX_RETRIES)
        raise exc

    _retry_pacs_work(task, f"image {image_id}: report", exc, settings, spent)


# on the report queue (shared/queue.py routes it); acks_late as above, from the app's config
@app.task(name=DELIVER_TASK, bind=True)
def deliver_report(self: Task, image_id: str) -> None:
    settings = get_settings()
    try:
        deliver(image_id, sessions(), pacs(), settings, model=model_info())
    except PACS_TRANSIENT as exc:
        _retry_delivery(self, image_id, exc, settings)
    except Exception as exc:
        if is_transient(exc):
            _retry_delivery(self, image_id, exc, settings)
            return
        # A bug: end the delivery (or the sweeper would resend it for ever); the exception's
        # message may quote the PACS's values, so only its type is logged, and it is not raised.
        log.error("image %s: report: unexpected %s", image_id, type(exc).__name__)
        try:
            fail(image_id, sessions(), INTERNAL_ERROR)
        except Exception as again:
            log.error("image %s: cannot record the failure (%s)", image_id, type(again).__name__)


def _retry_pull(task: Task, job_id: str, exc: Exception, settings: Settings) -> None:
    """Once the retries are spent the pull fails (``pacs_unreachable``): the instances stored
    so far stay in the job and are scored."""

    def spent() -> None:
        end_pull(sessions(), job_id, PullStatus.FAILED, "pacs_unreachable")

    _retry_pacs_work(task, f"pull job {job_id}", exc, settings, spent)


# on the PACS queue (shared/queue.py routes it)
@app.task(name=PULL_TASK, bind=True)
def pull_job(self: Task, job_id: str) -> None:
    settings = get_settings()
    try:
        pull(job_id, sessions(), pacs(), blobs(), app, settings)
    except SoftTimeLimitExceeded:
        # what was stored is committed, batch by batch: a fresh task carries on from there
        log.info("pull job %s: time limit reached; continuing in a new task", job_id)
        enqueue_pull(app, job_id)
    except PacsUnavailableError as exc:
        _retry_pull(self, job_id, exc, settings)
    except PacsError as exc:  # the PACS refused the query or an instance: asking again won't do
        log.warning("pull job %s: the PACS refused (%s)", job_id, type(exc).__name__)
        end_pull(sessions(), job_id, PullStatus.FAILED, "pacs_refused")
    except Exception as exc:
        if is_transient(exc):
            _retry_pull(self, job_id, exc, settings)
            return
        log.error("pull job %s: unexpected %s", job_id, type(exc).__name__)
        end_pull(sessions(), job_id, PullStatus.FAILED, "internal_error")
    finally:  # an ended pull may end the job (its images all done, or none found)
        callback_if_ended(app, sessions(), job_id=job_id)


def _heatmap(image_id: str, model_version: str) -> str | None:
    """The rendered heat map's blob key; None (logged) when there is nothing to render."""
    model = classifier()
    if model.info.version != model_version:  # a worker still on another model
        log.warning("image %s: heat map asked of model %s, not this one", image_id, model_version)
        return None
    key = render_heatmap(image_id, sessions(), blobs(), model, get_settings())
    if key is None:
        log.warning("image %s: no such image; no heat map", image_id)
    return key


# On the PACS queue (shared/queue.py routes it).  Never retried and never raised: a failure
# (the film unreadable, the store or the database away) is logged by its type and marked, so
# the API answers "unavailable" (not "pending" for ever) until the marker ends; a GET after
# that asks again.
@app.task(name=HEATMAP_TASK)
def render_heatmap_task(image_id: str, model_version: str) -> None:
    try:
        key = _heatmap(image_id, model_version)
        if key is not None:
            heatmap_rendered(app, image_id, model_version, key)
            log.info("image %s: heat map rendered", image_id)
            return
    except Exception as exc:
        log.warning("image %s: heat map failed (%s)", image_id, type(exc).__name__)
    try:
        heatmap_failed(app, image_id, model_version)
    except Exception as exc:
        log.warning("image %s: heat map failure not marked (%s)", image_id, type(exc).__name__)


# On the PACS queue (shared/queue.py routes it).  Retried without a count: deliver_callback
# stops at CXR_CALLBACK_MAX_SECONDS after the job ended.
@app.task(name=CALLBACK_TASK, bind=True, max_retries=None)
def deliver_callback_task(self: Task, job_id: str) -> None:
    settings = get_settings()
    try:
        outcome = deliver_callback(job_id, sessions(), settings, callback_http())
    except SoftTimeLimitExceeded:
        # a POST cut off is recorded (a timeout) by deliver_callback: this is the database
        # too slow around it; the claim runs out, the sweeper resends, and an attempt that
        # finds CXR_CALLBACK_MAX_SECONDS spent fails the callback instead
        log.warning("job %s: callback outlived the task; the sweeper resends it", job_id)
        return
    except Exception as exc:
        if is_transient(exc):  # the database: its claim runs out, then the sweeper resends it
            log.warning("job %s: callback: transient %s", job_id, type(exc).__name__)
            return
        log.error("job %s: callback: unexpected %s", job_id, type(exc).__name__)
        try:
            fail_callback(sessions(), job_id, CALLBACK_BUG)
        except Exception as again:
            log.error("job %s: cannot record the failure (%s)", job_id, type(again).__name__)
        return
    if outcome.retry_in is not None:
        raise self.retry(countdown=outcome.retry_in)
