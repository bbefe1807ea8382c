"""``GET /metrics``: cluster gauges in the Prometheus text format, computed at each scrape.

Invariant: every value is read from Redis and the database when scraped (a custom Collector,
no process-local state), so any gunicorn worker of any API host answers the same, whatever host
the workers run on.  No patient data: counts, ages and the model version only.  A source that
cannot be read (Redis or the database away) leaves its metrics out and sets ``cxr_scrape_error``.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

from celery import Celery
from flask import Blueprint, Flask, Response, current_app
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from api.extensions import service
from shared.db import as_utc, utcnow
from shared.dispatch import undispatched
from shared.models import Chunk, ChunkStatus, Image, ImageStatus
from shared.queue import PACS_QUEUE, QUEUE

log = logging.getLogger(__name__)

bp = Blueprint("metrics", __name__)

#: The window of the throughput gauges, in seconds.
WINDOW = 60


@dataclass
class Snapshot:
    """The cluster's state at one instant (None: that source could not be read)."""

    queue_depth: dict[str, int] | None = None
    # queued chunks not yet dispatched to the broker (shared/dispatch.py), and their images
    undispatched_chunks: int | None = None
    undispatched_images: int | None = None
    images: dict[str, int] | None = None
    finished: dict[str, int] | None = None  # in the last WINDOW seconds, by terminal status
    oldest_queued_seconds: float | None = None
    errors: list[str] = field(default_factory=list)


def queue_depths(celery: Celery) -> dict[str, int]:
    """Messages waiting per queue; ``cxr`` counts the ones reserved by workers (unacked) too."""
    with celery.connection_for_write() as conn:
        client = conn.default_channel.client
        return {
            QUEUE: int(client.llen(QUEUE)) + int(client.hlen("unacked")),
            PACS_QUEUE: int(client.llen(PACS_QUEUE)),
        }


def _read_db(session: Session, snap: Snapshot) -> None:
    now = utcnow()
    rows = session.execute(select(Image.status, func.count()).group_by(Image.status)).all()
    snap.images = {str(s): 0 for s in ImageStatus} | {str(s): int(n) for s, n in rows}
    recent = session.execute(
        select(Image.status, func.count())
        .where(Image.finished_at >= now - dt.timedelta(seconds=WINDOW))
        .group_by(Image.status)
    ).all()
    done = {str(s): int(n) for s, n in recent}
    snap.finished = {s: done.get(s, 0) for s in (ImageStatus.COMPLETED, ImageStatus.FAILED)}
    # chunks, not images: (status, ...) is indexed there, and a chunk's images share its age
    oldest = as_utc(
        session.scalar(select(func.min(Chunk.created_at)).where(Chunk.status == ChunkStatus.QUEUED))
    )
    snap.oldest_queued_seconds = (now - oldest).total_seconds() if oldest else 0.0
    snap.undispatched_chunks, snap.undispatched_images = undispatched(session)


def snapshot(celery: Celery, sessions: sessionmaker[Session]) -> Snapshot:
    snap = Snapshot()
    try:
        snap.queue_depth = queue_depths(celery)
    except Exception as exc:
        log.warning("metrics: cannot read the broker (%s)", type(exc).__name__)
        snap.errors.append("redis")
    try:
        with sessions() as session:
            _read_db(session, snap)
    except Exception as exc:
        log.warning("metrics: cannot read the database (%s)", type(exc).__name__)
        snap.errors.append("database")
    if snap.queue_depth is not None and snap.undispatched_chunks is not None:
        # the broker holds only a few messages by design: the chunks still waiting for their
        # turn in the database are queue depth too (what an autoscaler must see)
        snap.queue_depth[QUEUE] += snap.undispatched_chunks
    return snap


def _gauge(name: str, doc: str, label: str, values: dict[str, int]) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc, labels=[label])
    for key, value in values.items():
        g.add_metric([key], value)
    return g


class ClusterCollector(Collector):
    """Reads the cluster's state on every collect() (that is, every scrape)."""

    def __init__(
        self, celery: Celery, sessions: sessionmaker[Session], model_version: str | None
    ) -> None:
        self.celery, self.sessions, self.model_version = celery, sessions, model_version

    def collect(self) -> Iterator[GaugeMetricFamily | InfoMetricFamily]:
        snap = snapshot(self.celery, self.sessions)
        if snap.queue_depth is not None:
            yield _gauge(
                "cxr_queue_depth",
                "Chunks waiting or in hand (cxr: broker messages plus chunks not yet "
                "dispatched; cxr-pacs: broker messages)",
                "queue",
                snap.queue_depth,
            )
        if snap.undispatched_chunks is not None:
            yield GaugeMetricFamily(
                "cxr_undispatched_chunks",
                "Queued chunks waiting in the database for their turn to be dispatched",
                value=snap.undispatched_chunks,
            )
            yield GaugeMetricFamily(
                "cxr_undispatched_images",
                "Unfinished images of the chunks not yet dispatched",
                value=snap.undispatched_images,
            )
        if snap.images is not None:
            yield _gauge("cxr_images", "Images by status", "status", snap.images)
        if snap.finished is not None:
            yield _gauge(
                "cxr_images_finished_last_minute",
                f"Images that ended in the last {WINDOW} s, by status",
                "status",
                snap.finished,
            )
        if snap.oldest_queued_seconds is not None:
            yield GaugeMetricFamily(
                "cxr_oldest_queued_seconds",
                "Age of the oldest queued chunk (0: none queued)",
                value=snap.oldest_queued_seconds,
            )
        info = InfoMetricFamily("cxr_model", "The model the API serves")
        info.add_metric([], {"version": self.model_version or "none"})
        yield info
        yield _gauge(
            "cxr_scrape_error",
            "1 when a source could not be read during this scrape",
            "source",
            {s: int(s in snap.errors) for s in ("redis", "database")},
        )


def make_registry(
    celery: Celery, sessions: sessionmaker[Session], model_version: str | None
) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ClusterCollector(celery, sessions, model_version))
    return registry


@bp.get("/metrics")
def metrics() -> Response:
    """No API key, like /healthz: counts only; restrict it at the network (ingress) level."""
    registry = current_app.extensions["cxr_metrics"]
    return Response(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)


def init_app(app: Flask) -> None:
    """Register /metrics on the app's database and broker (after ``service.init_app``)."""
    state = app.extensions[service.key]
    version = state.model.version if state.model else None
    app.extensions["cxr_metrics"] = make_registry(state.celery, state.sessions, version)
    app.register_blueprint(bp)
