"""The worker's Celery app.  Start with ``cxr worker`` (or ``celery -A worker.celery_app``).

TensorFlow is loaded after the fork in each prefork pool process (``worker_process_init``), or
in the worker itself, before it reports ready, with ``--pool solo``; never in a prefork parent.

Every worker consumes the PACS queue (``cxr-pacs``: reports sent back, pulls) besides the ones
``-Q`` names, so a deployment needs no worker of its own for them: they never queue behind a
backlog of chunks (nor chunks behind them), though they share the workers' processes.
"""

from __future__ import annotations

from celery.concurrency.solo import TaskPool as SoloPool
from celery.signals import celeryd_after_setup, worker_process_init, worker_ready

from shared.queue import PACS_QUEUE, make_celery
from shared.settings import get_settings

app = make_celery(get_settings(), name="cxr-worker")
app.conf.include = ["worker.tasks"]


@celeryd_after_setup.connect
def _consume_reports(sender: object = None, instance: object = None, **_kwargs: object) -> None:
    """Add the report queue to what this worker consumes, whatever ``-Q`` selected."""
    instance.app.amqp.queues.select_add(PACS_QUEUE)  # type: ignore[attr-defined]


def _load_model() -> None:
    from worker.resources import classifier

    classifier()


@worker_process_init.connect
def _load_model_in_child(**_kwargs: object) -> None:
    _load_model()


@worker_ready.connect
def _load_model_if_solo(sender: object = None, **_kwargs: object) -> None:
    if isinstance(getattr(sender, "pool", None), SoloPool):
        _load_model()
