"""The worker's Celery app.  Start with ``cxr worker`` (or ``celery -A worker.celery_app``).

TensorFlow is loaded after the fork in each prefork pool process (``worker_process_init``), or
in the worker itself, before it reports ready, with ``--pool solo``; never in a prefork parent.

Every worker consumes the PACS queue (``cxr-pacs``: reports sent back, pulls) besides the ones
``-Q`` names, so a deployment needs no worker of its own for them: they never queue behind a
backlog of chunks (nor chunks behind them), though they share the workers' processes.

Logging is the service's own set-up (:mod:`shared.logs`), not Celery's; while a task runs, its
lines carry the ids its arguments name and their job's id.
"""

from __future__ import annotations

import inspect
from typing import Any

from celery.concurrency.solo import TaskPool as SoloPool
from celery.signals import (
    celeryd_after_setup,
    celeryd_init,
    setup_logging,
    task_postrun,
    task_prerun,
    worker_process_init,
    worker_ready,
)

from shared import logs
from shared.queue import PACS_QUEUE, make_celery
from shared.settings import get_settings

app = make_celery(get_settings(), name="cxr-worker")
app.conf.include = ["worker.tasks"]


@setup_logging.connect
def _configure_logging(loglevel: Any = None, **_kwargs: object) -> None:
    """The service's one logging set-up instead of Celery's (``--loglevel`` still rules)."""
    logs.configure_logging(get_settings(), level=loglevel)


@celeryd_init.connect
def _before_start(instance: Any = None, **_kwargs: object) -> None:
    """Logging set up before Celery's first checks warn; and no start-up banner (many lines of
    plain text) in a stream of JSON lines."""
    settings = get_settings()
    logs.configure_logging(settings)
    if settings.log_format == "json":
        instance.quiet = True


def _job_of(ids: dict[str, str]) -> str | None:
    """The job of the chunk or image a task works on (a task's message names only that)."""
    from sqlalchemy import select

    from shared.models import Chunk, Image
    from worker.resources import sessions

    if "chunk_id" in ids:
        query = select(Chunk.job_id).where(Chunk.id == ids["chunk_id"])
    elif "image_id" in ids:
        query = select(Image.job_id).where(Image.id == ids["image_id"])
    else:
        return None
    try:
        with sessions()() as session:
            return session.scalar(query)
    except Exception:  # the database is away: the task itself will find out and retry
        return None


@task_prerun.connect
def _bind_task_ids(task: Any = None, args: Any = (), kwargs: Any = None, **_: object) -> None:
    """Bind the ids a task's arguments name (``chunk_id``, ``image_id``, ``job_id``) and the
    job they belong to, so every line the task logs carries them."""
    logs.clear()
    try:
        named = inspect.signature(task.run).bind_partial(*args, **(kwargs or {})).arguments
    except (TypeError, ValueError):
        return
    ids = {k: v for k, v in named.items() if k in logs.ID_FIELDS and isinstance(v, str)}
    if "job_id" not in ids and get_settings().log_format == "json":  # text lines don't show it
        ids["job_id"] = _job_of(ids)
    logs.bind(**ids)


@task_postrun.connect
def _clear_task_ids(**_kwargs: object) -> None:
    logs.clear()


@celeryd_after_setup.connect
def _consume_reports(sender: object = None, instance: object = None, **_kwargs: object) -> None:
    """Add the report queue to what this worker consumes, whatever ``-Q`` selected."""
    instance.app.amqp.queues.select_add(PACS_QUEUE)  # type: ignore[attr-defined]


def _load_model() -> None:
    """Lower this process's CPU priority (CXR_WORKER_NICE: scoring is batch work, the API's
    answers are not), then load the model."""
    import os

    from worker.resources import classifier

    nice = get_settings().worker_nice
    if nice:
        os.nice(nice)
    classifier()


@worker_process_init.connect
def _load_model_in_child(**_kwargs: object) -> None:
    _load_model()


@worker_ready.connect
def _load_model_if_solo(sender: object = None, **_kwargs: object) -> None:
    if isinstance(getattr(sender, "pool", None), SoloPool):
        _load_model()
