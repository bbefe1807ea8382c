"""Fault injection on a running stack: every accepted image must end with exactly one terminal
state and no duplicate result rows, whatever happens to workers, Redis or the database.

Each test submits real jobs, injects the fault into real processes, drains, and checks the
database.  Run them alone with ``pytest -m fault``.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from shared.models import TERMINAL_IMAGE, Chunk, ChunkStatus, Image, ImageStatus
from shared.redis_server import RedisServer, free_port
from shared.settings import load_settings
from tests.factories import make_key, png_bytes, png_files, submit, with_key
from tests.service_client import assert_exactly_one_outcome, wait_for

pytestmark = [pytest.mark.fault, pytest.mark.integration]

# Short leases so that recovery happens within seconds; the invariants between the settings
# (visibility >= 2 x task limit, lease > task limit) still hold.
FAULT_TIMINGS = {
    "CXR_TASK_TIME_LIMIT": "10",
    "CXR_LEASE_SECONDS": "12",
    "CXR_VISIBILITY_TIMEOUT": "30",
    "CXR_SWEEP_INTERVAL": "1",
    "CXR_ENQUEUE_GRACE_SECONDS": "2",
    "CXR_CHUNK_SIZE": "6",
}


@pytest.fixture
def service_env(service_env: dict[str, str]) -> dict[str, str]:
    return {**service_env, **FAULT_TIMINGS}


def big_films(n: int, seed: int = 0) -> list[tuple[str, bytes]]:
    """Large enough that a chunk takes a noticeable time to decode."""
    return [(f"film-{k}.png", png_bytes(seed + k, height=1400, width=1400)) for k in range(n)]


class Db:
    """Read-only views of the test database for the assertions."""

    def __init__(self, sessions) -> None:
        self.sessions = sessions

    def running_chunk(self) -> str | None:
        with self.sessions() as s:
            return s.scalar(select(Chunk.id).where(Chunk.status == ChunkStatus.RUNNING).limit(1))

    def chunk(self, chunk_id: str) -> Chunk:
        with self.sessions() as s:
            return s.get(Chunk, chunk_id)

    def completed(self, job_id: str) -> int:
        with self.sessions() as s:
            return len(
                s.scalars(
                    select(Image.id).where(
                        Image.job_id == job_id, Image.status == ImageStatus.COMPLETED
                    )
                ).all()
            )

    def done(self, job_ids: list[str]) -> bool:
        with self.sessions() as s:
            return not s.scalars(
                select(Image.id)
                .where(Image.job_id.in_(job_ids), Image.status.not_in(TERMINAL_IMAGE))
                .limit(1)
            ).all()

    def chunks(self, job_id: str) -> list[Chunk]:
        with self.sessions() as s:
            return list(s.scalars(select(Chunk).where(Chunk.job_id == job_id)))

    def images(self, job_id: str) -> list[Image]:
        with self.sessions() as s:
            return list(s.scalars(select(Image).where(Image.job_id == job_id)))


@pytest.fixture
def db(db_sessions) -> Db:
    return Db(db_sessions)


def test_worker_killed_mid_chunk(client, db, database_url, start_worker, start_sweeper) -> None:
    first = start_worker()
    start_sweeper()
    job = submit(client, big_films(24))["id"]
    victim = wait_for(db.running_chunk, 60, "a chunk in progress")
    first.kill_all()
    assert db.chunk(victim).status == ChunkStatus.RUNNING  # killed in the middle of it
    start_worker()
    wait_for(lambda: db.done([job]), 120, "the job to drain")
    counts = assert_exactly_one_outcome(database_url, [job])
    assert counts == {ImageStatus.COMPLETED: 24}
    assert db.chunk(victim).attempts >= 2


def test_pool_child_killed_mid_chunk(client, db, database_url, start_worker) -> None:
    """Only the pool process dies (OOM killer, segfault): the worker requeues at once."""
    worker = start_worker()
    job = submit(client, big_films(18))["id"]
    victim = wait_for(db.running_chunk, 60, "a chunk in progress")
    children = worker.children()
    assert children, "no pool child found"
    for pid in children:
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: db.done([job]), 120, "the job to drain")
    assert assert_exactly_one_outcome(database_url, [job]) == {ImageStatus.COMPLETED: 18}
    assert db.chunk(victim).attempts >= 2
    assert worker.alive


def test_worker_warm_shutdown_finishes_its_chunk(client, db, database_url, start_worker) -> None:
    first = start_worker()
    job = submit(client, big_films(24))["id"]
    in_hand = wait_for(db.running_chunk, 60, "a chunk in progress")
    first.signal(signal.SIGTERM)
    assert first.process.wait(60) == 0
    assert db.chunk(in_hand).status == ChunkStatus.DONE  # finished, not abandoned
    assert not db.done([job])  # the rest waits in Redis for the next worker
    start_worker()
    wait_for(lambda: db.done([job]), 120, "the job to drain")
    assert assert_exactly_one_outcome(database_url, [job]) == {ImageStatus.COMPLETED: 24}
    assert max(i.attempts for i in db.images(job)) == 0  # no attempt was interrupted
    assert {c.attempts for c in db.chunks(job)} == {1}  # every chunk was processed once


@pytest.mark.parametrize("appendonly", [True, False], ids=["aof", "no-persistence"])
def test_redis_restarted_during_a_job(
    appendonly,
    service_env,
    db,
    db_sessions,
    database_url,
    start_worker,
    start_sweeper,
    tmp_path: Path,
) -> None:
    """With AOF the queued messages survive; without persistence the sweeper rebuilds them
    from the database (queue and unacked set empty, chunks still queued)."""
    from api import create_app

    redis = RedisServer(free_port(), tmp_path / "redis-own", appendonly=appendonly).start()
    try:
        env = {**service_env, "CXR_REDIS_URL": redis.url}
        settings = load_settings(env)
        api = with_key(create_app(settings).test_client(), make_key(db_sessions, "h"))
        start_worker(CXR_REDIS_URL=redis.url)
        start_sweeper(CXR_REDIS_URL=redis.url)
        jobs = [submit(api, big_films(18, seed=s))["id"] for s in (0, 100)]
        wait_for(lambda: db.completed(jobs[0]) > 0, 90, "some progress")
        redis.stop()
        time.sleep(2)
        redis.start()
        wait_for(lambda: db.done(jobs), 180, "both jobs to drain after the restart")
        assert assert_exactly_one_outcome(database_url, jobs) == {ImageStatus.COMPLETED: 36}
    finally:
        redis.stop()


def test_database_unreachable_for_a_while(
    service_env, db, database_url, client, start_worker, start_sweeper
) -> None:
    if not database_url.startswith("postgresql"):
        pytest.skip(
            "an outage is simulated on the network path to PostgreSQL; a SQLite file "
            "cannot become unreachable"
        )
    from sqlalchemy.engine import make_url

    from tests.netfault import CuttableProxy

    url = make_url(database_url)
    proxy = CuttableProxy((url.host or "127.0.0.1", url.port or 5432))
    try:
        via_proxy = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
        start_worker(CXR_DATABASE_URL=via_proxy)
        start_sweeper(CXR_DATABASE_URL=via_proxy)
        job = submit(client, big_films(30))["id"]
        wait_for(lambda: db.completed(job) > 0, 90, "some progress")
        proxy.cut()
        time.sleep(8)  # workers see connection errors and back off
        proxy.restore()
        wait_for(lambda: db.done([job]), 180, "the job to drain once the database is back")
        assert assert_exactly_one_outcome(database_url, [job]) == {ImageStatus.COMPLETED: 30}
    finally:
        proxy.close()


def test_enqueue_failure_after_commit_is_recovered_by_the_sweeper(
    service_env, db, database_url, start_worker, start_sweeper, api_key
) -> None:
    """Redis is unreachable when the API enqueues: the job is accepted anyway (it is in the
    database), and the sweeper sends its chunks once the grace period is over."""
    from api import create_app

    broken = load_settings({**service_env, "CXR_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})
    api = with_key(create_app(broken).test_client(), api_key)
    job = submit(api, png_files(8))["id"]
    start_worker()
    time.sleep(2)
    assert db.completed(job) == 0  # nothing was sent
    start_sweeper()
    wait_for(lambda: db.done([job]), 120, "the sweeper to recover the job")
    assert assert_exactly_one_outcome(database_url, [job]) == {ImageStatus.COMPLETED: 8}


def test_poison_image_fails_after_max_attempts_and_the_rest_completes(
    client, db, database_url, start_worker, start_sweeper, settings
) -> None:
    from tests.poison_worker import MARKER

    worker = start_worker(pool="prefork", app="tests.poison_worker")
    start_sweeper()
    films = png_files(6)
    films[2] = ("poison.png", png_bytes(2) + MARKER)  # a valid PNG; the decoder "crashes"
    job = submit(client, films)["id"]
    wait_for(lambda: db.done([job]), 180, "the job to drain")
    by_name = {i.filename: i for i in db.images(job)}
    poison = by_name.pop("poison.png")
    assert poison.status == ImageStatus.FAILED
    assert poison.error_code == "too_many_attempts"
    assert poison.attempts == settings.max_attempts
    assert {i.status for i in by_name.values()} == {ImageStatus.COMPLETED}
    assert assert_exactly_one_outcome(database_url, [job]) == {
        ImageStatus.COMPLETED: 5,
        ImageStatus.FAILED: 1,
    }
    assert worker.alive  # the pool replaced its dead children; the worker itself lives on
