"""The Alembic migrations and the SQLAlchemy models describe the same schema."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from shared.db import make_engine
from shared.models import Base


def test_migrations_match_models(database_url: str) -> None:
    engine = make_engine(database_url)  # the fixture already ran `upgrade head`
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
            assert diff == [], f"models and migrations disagree: {diff}"
            tables = set(inspect(conn).get_table_names())
            assert {"jobs", "chunks", "images", "results", "alembic_version"} <= tables
    finally:
        engine.dispose()


def test_sqlite_runs_in_wal_mode(tmp_path) -> None:
    from sqlalchemy import text

    engine = make_engine(f"sqlite:///{tmp_path / 'x.db'}")
    with engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA busy_timeout")).scalar() >= 10_000
    engine.dispose()


def test_upgrade_keeps_existing_jobs(tmp_path) -> None:
    """The second revision adds a NOT NULL owner column to a table that may hold rows."""
    from sqlalchemy import text

    from shared.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'old.db'}"
    upgrade(url, "e1c0546710dd")
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO jobs (id, model_version, image_count, created_at) "
                "VALUES ('j1', 'v', 0, CURRENT_TIMESTAMP)"
            )
        )
    upgrade(url)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT client FROM jobs WHERE id = 'j1'")).scalar() == "anonymous"
    engine.dispose()
