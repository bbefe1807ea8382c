"""The job summary: one shape for ``GET /v1/jobs/{id}`` (the API adds a page of images) and
for the body of the job's signed callback (worker/callbacks.py), so the two cannot drift.

Invariant: a summary holds counts, timestamps and what the client itself sent (``client_ref``,
its callback URL); never an image's filename, UIDs or result.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from shared.db import as_utc
from shared.models import TERMINAL_IMAGE, TERMINAL_JOB, Image, ImageStatus, Job, job_status


def iso(value: dt.datetime | None) -> str | None:
    value = as_utc(value)
    return value.isoformat().replace("+00:00", "Z") if value else None


def callback_dict(job: Job) -> dict[str, Any] | None:
    """Where the job's callback stands; None for a job created without ``callback_url``."""
    if not job.callback_status:
        return None
    return {
        "url": job.callback_url,
        "status": job.callback_status,
        "attempts": job.callback_attempts or 0,
        "error_code": job.callback_error_code,
        "http_status": job.callback_http_status,
        "delivered_at": iso(job.callback_delivered_at),
    }


def job_summary(session: Session, job: Job) -> dict[str, Any]:
    rows = session.execute(
        select(
            Image.status,
            func.count(),
            func.min(Image.started_at),
            func.max(Image.finished_at),
        )
        .where(Image.job_id == job.id)
        .group_by(Image.status)
    ).all()
    counts = {s.value: 0 for s in ImageStatus}
    started: list[dt.datetime] = []
    finished: list[dt.datetime] = []
    for status, count, first_start, last_finish in rows:
        counts[status] = count
        if first_start:
            started.append(as_utc(first_start))  # type: ignore[arg-type]
        if last_finish:
            finished.append(as_utc(last_finish))  # type: ignore[arg-type]
    status = job_status(counts, job.pull_status).value
    total = sum(counts.values())
    terminal = sum(counts[s] for s in TERMINAL_IMAGE)
    done = status in TERMINAL_JOB
    return {
        "id": job.id,
        "status": status,
        "client_ref": job.client_ref,
        "model_version": job.model_version,
        "image_count": total,
        "counts": counts,
        "progress": round(terminal / total, 4) if total else 1.0,
        "created_at": iso(job.created_at),
        "started_at": iso(min(started)) if started else None,
        "completed_at": iso(max(finished)) if done and finished else None,
        "source": job.source,
        "pull": (
            {"status": job.pull_status, "error_code": job.pull_error_code}
            if job.pull_status
            else None
        ),
        "callback": callback_dict(job),
        "links": {
            "self": f"/v1/jobs/{job.id}",
            "results_csv": f"/v1/jobs/{job.id}/results.csv",
        },
    }
