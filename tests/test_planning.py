"""Chunk assignment (shared/planning.py), which the API and the test factories share."""

from __future__ import annotations

import pytest

from shared.models import Image, ImageStatus, Job, new_id
from shared.planning import plan_job


def _images(job: Job, statuses: list[ImageStatus]) -> list[Image]:
    return [
        Image(id=new_id(), job_id=job.id, position=n, filename=f"{n}.png", status=status)
        for n, status in enumerate(statuses)
    ]


@pytest.mark.parametrize(("queued", "chunk_size", "sizes"), [(5, 2, [2, 2, 1]), (4, 4, [4])])
def test_queued_images_fill_chunks_in_order(queued: int, chunk_size: int, sizes: list[int]) -> None:
    job = Job(id=new_id())
    images = _images(job, [ImageStatus.QUEUED] * queued)
    plan = plan_job(job, images, chunk_size)
    assert [sum(i.chunk_id == c.id for i in images) for c in plan.chunks] == sizes
    order = [plan.chunk_ids.index(i.chunk_id) for i in images]
    assert order == sorted(order)  # submission order is kept across chunks


def test_images_refused_at_the_door_get_no_chunk() -> None:
    job = Job(id=new_id())
    statuses = [ImageStatus.FAILED, ImageStatus.QUEUED, ImageStatus.FAILED]
    images = _images(job, statuses)
    plan = plan_job(job, images, 32)
    assert [i.chunk_id is None for i in images] == [True, False, True]
    assert len(plan.chunks) == 1
    assert plan.images == images  # every image is written, refused or not


def test_a_job_of_refused_images_has_no_chunk() -> None:
    job = Job(id=new_id())
    assert plan_job(job, _images(job, [ImageStatus.FAILED] * 2), 32).chunks == []
