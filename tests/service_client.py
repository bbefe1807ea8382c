"""Polling and database checks for the tests that drive a running stack (jobs are submitted
with ``tests.factories.submit_http``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import requests
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError

from shared.db import database
from shared.models import TERMINAL_IMAGE, TERMINAL_JOB, Image, ImageStatus, Result

#: What a busy machine throws at a wait now and then (a slow answer, a refused connection, a
#: half-started server, a database restarting): retried until the wait's one overall deadline.
TRANSIENT = (requests.RequestException, OSError, ValueError, OperationalError)


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Call ``predicate`` until it returns something truthy; transient errors are retried, and
    only the overall ``timeout`` ends the wait."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except TRANSIENT as exc:
            last, value = exc, None
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what} (last error: {last!r})")


def wait_done(http: requests.Session, url: str, job_id: str, timeout: float = 180) -> dict:
    def finished() -> dict | None:
        body = http.get(f"{url}/v1/jobs/{job_id}", params={"per_page": 500}, timeout=10).json()
        return body if body.get("status") in TERMINAL_JOB else None

    return wait_for(finished, timeout, f"job {job_id} to finish", interval=0.3)


def result_rows(database_url: str, job_id: str) -> dict[str, int]:
    """Number of result rows per image id of a job (each must be exactly 1)."""
    with database(database_url) as sessions, sessions() as session:
        rows = session.execute(
            select(Result.image_id, func.count())
            .join(Image, Image.id == Result.image_id)
            .where(Image.job_id == job_id)
            .group_by(Result.image_id)
        ).all()
    return dict(rows)


def assert_exactly_one_outcome(database_url: str, job_ids: list[str]) -> dict[str, int]:
    """Every image of these jobs is terminal; completed ones have exactly one result row,
    failed and skipped ones none (and a recorded reason).  Returns the count of images per
    status."""
    with database(database_url) as sessions, sessions() as session:
        rows = session.execute(
            select(Image.id, Image.status, Image.error_code, func.count(Result.image_id))
            .outerjoin(Result, Result.image_id == Image.id)
            .where(Image.job_id.in_(job_ids))
            .group_by(Image.id, Image.status, Image.error_code)
        ).all()
    counts: dict[str, int] = {}
    assert rows, "no images"
    for image_id, status, error_code, n_results in rows:
        assert status in TERMINAL_IMAGE, f"image {image_id} ended {status}"
        expected = 1 if status == ImageStatus.COMPLETED else 0
        assert n_results == expected, f"image {image_id} ({status}) has {n_results} results"
        if status != ImageStatus.COMPLETED:
            assert error_code, f"image {image_id} ended {status} without a reason"
        counts[status] = counts.get(status, 0) + 1
    return counts
