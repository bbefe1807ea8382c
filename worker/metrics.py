"""Worker process metrics (Prometheus), served by each worker on ``CXR_METRICS_PORT`` (0: off).

Invariant: with the port set, ``PROMETHEUS_MULTIPROC_DIR`` points to a directory of this worker's
own before ``prometheus_client`` is imported, so every prefork child (forked from the parent that
imported this module) writes its values there, and the parent's HTTP server sums them with a
``MultiProcessCollector``.  Recording never fails a task: a metrics error is logged and dropped.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Iterator

from shared.settings import get_settings

log = logging.getLogger(__name__)

_PORT = get_settings().metrics_port
if _PORT and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    # before prometheus_client is imported: it picks its value class at import
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="cxr-worker-metrics-")

from celery.signals import worker_process_shutdown, worker_ready  # noqa: E402
from prometheus_client import (  # noqa: E402
    CollectorRegistry,
    Counter,
    Histogram,
    multiprocess,
    start_http_server,
)
from sqlalchemy import select  # noqa: E402
from sqlalchemy.orm import Session, sessionmaker  # noqa: E402

from shared.db import as_utc  # noqa: E402
from shared.models import Image  # noqa: E402

CHUNK_SECONDS = Histogram(
    "cxr_chunk_seconds",
    "Time to process one chunk task (claim, decode, inference, store)",
    buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600),
)
IMAGE_LATENCY = Histogram(
    "cxr_image_latency_seconds",
    "End-to-end latency of an image, from its submission to its terminal status",
    buckets=(1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200),
)
BATCH_SIZE = Histogram(
    "cxr_inference_batch_size",
    "Images scored per chunk execution (the model's batch)",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
IMAGES = Counter("cxr_worker_images", "Images this worker ended, by outcome", ["outcome"])


def _registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return registry


@worker_ready.connect
def _serve(**_kwargs: object) -> None:
    """In the worker's parent: serve the children's summed metrics."""
    if not _PORT:
        return
    start_http_server(_PORT, registry=_registry())
    log.info("worker metrics on port %d", _PORT)


@worker_process_shutdown.connect
def _mark_dead(pid: int | None = None, **_kwargs: object) -> None:
    """A pool child that exits drops its live gauges (counters and histograms are kept)."""
    if _PORT:
        multiprocess.mark_process_dead(pid or os.getpid())


def _latencies(sessions: sessionmaker[Session], chunk_id: str, since: float) -> Iterator[float]:
    """Created-to-finished seconds of the chunk's images that ended since ``since`` (epoch)."""
    with sessions() as session:
        rows = session.execute(
            select(Image.created_at, Image.finished_at).where(
                Image.chunk_id == chunk_id, Image.finished_at.is_not(None)
            )
        ).all()
    for created, finished in rows:
        finished, created = as_utc(finished), as_utc(created)
        if finished is not None and created is not None and finished.timestamp() >= since:
            yield (finished - created).total_seconds()


def record_chunk(
    sessions: sessionmaker[Session], chunk_id: str, outcome: object, started: float
) -> None:
    """Record one chunk execution (``outcome``: a worker.processing.ChunkOutcome)."""
    try:
        CHUNK_SECONDS.observe(time.time() - started)
        completed = int(getattr(outcome, "completed", 0))
        if completed:
            BATCH_SIZE.observe(completed)
        for name in ("completed", "failed", "out_of_scope"):
            n = int(getattr(outcome, name, 0))
            if n:
                IMAGES.labels(outcome=name).inc(n)
        for seconds in _latencies(sessions, chunk_id, started - 1):
            IMAGE_LATENCY.observe(max(seconds, 0.0))
    except Exception as exc:  # metrics must never fail the chunk
        log.warning("chunk %s: metrics not recorded (%s)", chunk_id, type(exc).__name__)
