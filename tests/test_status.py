"""``cxr status``: one read-only screen from Redis and the database."""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import select, update

from cli.main import main
from shared.db import utcnow
from shared.models import Chunk, ChunkStatus, Image, ImageStatus
from shared.settings import get_settings
from tests.factories import png_files, submit


@pytest.fixture
def cli_env(service_env: dict[str, str], monkeypatch: pytest.MonkeyPatch):
    for name, value in service_env.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_status_shows_queue_images_and_stuck_chunks(cli_env, client, db_sessions, capsys) -> None:
    job = submit(client, png_files(6))  # two chunks of 4 and 2
    first = job["images"][0]["id"]
    with db_sessions.begin() as session:
        session.execute(
            update(Image)
            .where(Image.id == first)
            .values(status=ImageStatus.COMPLETED, finished_at=utcnow())
        )
        chunk_id = session.scalar(select(Image.chunk_id).where(Image.id == first))
        session.execute(  # its worker died: the lease ran out
            update(Chunk)
            .where(Chunk.id == chunk_id)
            .values(status=ChunkStatus.RUNNING, lease_expires_at=utcnow() - dt.timedelta(seconds=5))
        )

    assert main(["status", "--no-ping"]) == 0
    out = capsys.readouterr().out
    assert "queue depth        cxr: 2" in out
    assert "queue depth        cxr-pacs: 0" in out
    assert "1 completed, 0 failed" in out
    assert "queued 5" in out
    assert "completed 1" in out
    assert "1 running past their lease" in out
    # read-only: the sweeper's conditions were counted, not applied
    with db_sessions() as session:
        assert session.scalar(select(Chunk.status).where(Chunk.id == chunk_id)) == "running"


def test_status_pings_workers(cli_env, db_sessions, capsys) -> None:
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert "workers online     0" in out
    assert "oldest queued      0 s" in out
