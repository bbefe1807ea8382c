"""How a job's rows are laid out: which images go into which chunk, and the order they are written.

Invariant: every image not yet terminal belongs to exactly one chunk of at most ``chunk_size``
images, in submission order; an image refused at the door (already ``failed``, or ``skipped``
as a child's film: shared/ingest.py) belongs to none; no chunk is empty.  The API and the test
factories both plan jobs here, so chunk assignment lives in one place.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy.orm import Session

from shared.models import TERMINAL_IMAGE, Chunk, Image, Job, new_id


@dataclass(frozen=True)
class JobPlan:
    job: Job
    chunks: list[Chunk]
    images: list[Image]

    @property
    def chunk_ids(self) -> list[str]:
        return [c.id for c in self.chunks]


def plan_job(job: Job, images: Sequence[Image], chunk_size: int, **chunk_fields: object) -> JobPlan:
    """Chunks for the job's queued images (sets each one's ``chunk_id``); touches no database."""
    if chunk_size < 1:
        raise ValueError("chunk_size must be at least 1")
    queued = [image for image in images if image.status not in TERMINAL_IMAGE]
    chunks: list[Chunk] = []
    for start in range(0, len(queued), chunk_size):
        chunk = Chunk(id=new_id(), job_id=job.id, **chunk_fields)
        chunks.append(chunk)
        for image in queued[start : start + chunk_size]:
            image.chunk_id = chunk.id
    return JobPlan(job=job, chunks=chunks, images=list(images))


def add_plan(session: Session, plan: JobPlan) -> None:
    """Write the plan's rows parent first (the foreign keys hold at each flush)."""
    session.add(plan.job)
    session.flush()
    session.add_all(plan.chunks)
    session.flush()
    session.add_all(plan.images)
