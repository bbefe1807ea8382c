"""``cxr status``: one screen for ops, read from Redis and the database directly.

Invariant: read-only.  It changes nothing (the stuck chunks are counted with the sweeper's own
conditions, not reset), and prints counts, ages and ids' counts only, never patient data.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from shared.settings import Settings, get_settings

if TYPE_CHECKING:  # imported when the command runs: building the parser stays cheap
    from celery import Celery
    from sqlalchemy.orm import Session, sessionmaker

    from api.metrics import Snapshot


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="queue depth, workers, throughput and stuck chunks")
    p.add_argument(
        "--no-ping",
        action="store_true",
        help="do not ask the workers to answer (saves the one-second wait)",
    )
    p.set_defaults(func=cmd_status)


def _workers_online(celery: Celery) -> int | None:
    """Workers answering a broadcast ping within a second (None: the broker is away)."""
    try:
        replies = celery.control.inspect(timeout=1.0).ping()
    except Exception:
        return None
    return len(replies or {})


def _stuck(sessions: sessionmaker[Session], settings: Settings, celery: Celery) -> tuple[int, int]:
    from worker.sweeper import broker_is_idle, count_stranded

    idle = broker_is_idle(celery)
    with sessions() as session:
        return count_stranded(session, settings, idle)


def _lines(snap: Snapshot, workers: int | None, stuck: tuple[int, int]) -> list[str]:
    from api.metrics import WINDOW

    lines = []
    if snap.queue_depth is None:
        lines.append("queue depth        unavailable (Redis)")
    else:
        for queue, n in snap.queue_depth.items():
            lines.append(f"queue depth        {queue}: {n}")
    lines.append(f"workers online     {'unknown' if workers is None else workers}")
    if snap.images is None:
        lines.append("database           unavailable")
        return lines
    lines.append(  # counted in the queue depth above; they wait for their turn (fairness)
        f"not dispatched     {snap.undispatched_chunks} chunks "
        f"({snap.undispatched_images} images) wait for their turn"
    )
    done = snap.finished
    lines.append(
        f"last {WINDOW} s          {done['completed']} completed, {done['failed']} failed"
        f" ({done['completed'] / WINDOW:.2f} images/s)"
    )
    lines.append(f"oldest queued      {snap.oldest_queued_seconds:.0f} s")
    images = snap.images
    lines.append("images             " + ", ".join(f"{s} {n}" for s, n in images.items()))
    lines.append(
        f"stuck chunks       {stuck[0]} running past their lease, "
        f"{stuck[1]} whose message was lost (the sweeper sends them again)"
    )
    return lines


def cmd_status(args: argparse.Namespace) -> int:
    from api.metrics import snapshot
    from shared.db import database
    from shared.queue import make_celery

    settings = get_settings()
    celery = make_celery(settings, name="cxr-status")
    with database(settings.sqlalchemy_url) as sessions:
        snap = snapshot(celery, sessions)
        stuck = _stuck(sessions, settings, celery) if snap.images is not None else (0, 0)
    workers = None if args.no_ping or snap.queue_depth is None else _workers_online(celery)
    for line in _lines(snap, workers, stuck):
        print(line)
    return 0 if not snap.errors else 1
