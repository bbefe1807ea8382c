"""The Alembic migrations and the SQLAlchemy models describe the same schema."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text

from shared.db import database
from shared.migrate import upgrade
from shared.models import Base


def test_migrations_match_models(db_sessions) -> None:
    with db_sessions() as session:  # the fixture already ran `upgrade head`
        conn = session.connection()
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert diff == [], f"models and migrations disagree: {diff}"
        tables = set(inspect(conn).get_table_names())
    assert {"jobs", "chunks", "images", "results", "alembic_version"} <= tables


def test_sqlite_runs_in_wal_mode(tmp_path) -> None:
    with database(f"sqlite:///{tmp_path / 'x.db'}") as sessions, sessions() as session:
        assert session.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert session.execute(text("PRAGMA busy_timeout")).scalar() >= 10_000


def test_upgrade_keeps_existing_jobs(tmp_path) -> None:
    """The second revision adds a NOT NULL owner column to a table that may hold rows."""
    url = f"sqlite:///{tmp_path / 'old.db'}"
    upgrade(url, "e1c0546710dd")
    with database(url) as sessions, sessions.begin() as session:
        session.execute(
            text(
                "INSERT INTO jobs (id, model_version, image_count, created_at) "
                "VALUES ('j1', 'v', 0, CURRENT_TIMESTAMP)"
            )
        )
    upgrade(url)
    with database(url) as sessions, sessions() as session:
        client = session.execute(text("SELECT client FROM jobs WHERE id = 'j1'")).scalar()
    assert client == "anonymous"


def test_dropping_unread_columns_keeps_every_job_image_and_result(database_url) -> None:
    """The third revision drops five columns from tables that hold rows: none may be lost,
    and the downgrade brings the columns back."""
    from alembic import command

    from shared.migrate import alembic_config

    with database(database_url) as sessions, sessions() as session:
        conn = session.connection()
        before = {
            t: conn.execute(text(f"SELECT count(*) FROM {t}")).scalar()
            for t in ("jobs", "chunks", "images", "results")
        }
    command.downgrade(alembic_config(database_url), "1a4b6755f9c5")
    with database(database_url) as sessions, sessions.begin() as session:
        session.execute(
            text(
                "INSERT INTO jobs (id, client, model_version, image_count, created_at) "
                "VALUES ('j1', 'c', 'v', 1, CURRENT_TIMESTAMP)"
            )
        )
        session.execute(
            text(
                "INSERT INTO chunks (id, job_id, status, attempts, created_at, started_at) "
                "VALUES ('c1', 'j1', 'done', 1, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
            )
        )
        session.execute(
            text(
                "INSERT INTO images (id, job_id, chunk_id, position, filename, blob_key, "
                "size_bytes, status, attempts, created_at) VALUES ('i1', 'j1', 'c1', 0, "
                "'a.png', 'k', 10, 'completed', 1, CURRENT_TIMESTAMP)"
            )
        )
        session.execute(
            text(
                "INSERT INTO results (image_id, probability, label, model_version, created_at) "
                "VALUES ('i1', 0.25, 'normal', 'v', CURRENT_TIMESTAMP)"
            )
        )
    upgrade(database_url)
    with database(database_url) as sessions, sessions() as session:
        row = session.execute(
            text(
                "SELECT j.model_version, c.status, i.filename, r.probability FROM jobs j "
                "JOIN chunks c ON c.job_id = j.id JOIN images i ON i.chunk_id = c.id "
                "JOIN results r ON r.image_id = i.id WHERE j.id = 'j1'"
            )
        ).one()
        columns = {c["name"] for c in inspect(session.connection()).get_columns("images")}
    assert tuple(row) == ("v", "done", "a.png", 0.25)
    assert "size_bytes" not in columns
    command.downgrade(alembic_config(database_url), "1a4b6755f9c5")
    with database(database_url) as sessions, sessions() as session:
        count = session.execute(text("SELECT image_count FROM jobs WHERE id = 'j1'")).scalar()
        after = session.execute(text("SELECT count(*) FROM jobs")).scalar()
    assert count == 0  # the value is gone; the column and the row are back
    assert after == before["jobs"] + 1
    upgrade(database_url)
