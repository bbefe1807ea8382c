"""Engine and session set-up for SQLite (default) and PostgreSQL, plus dialect-aware upserts.

Invariant: every engine a command, sweeper, test or benchmark opens is disposed of by the same
``database()`` block that made it; only the long-lived API and worker processes hold one.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql.dml import Insert

SQLITE_BUSY_TIMEOUT_MS = 30_000


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def as_utc(value: dt.datetime | None) -> dt.datetime | None:
    """SQLite hands back naive datetimes; every timestamp we store is UTC."""
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine; SQLite gets WAL, a busy timeout and foreign keys, for many processes."""
    kwargs.setdefault("hide_parameters", True)  # error logs must not carry filenames
    if url.startswith("sqlite"):
        engine = create_engine(
            url,
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False},
            **kwargs,
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        return engine
    kwargs.setdefault("pool_pre_ping", True)
    if url.startswith("postgresql"):
        # a half-open socket must fail within seconds, not hang a task past its time limit
        kwargs.setdefault(
            "connect_args",
            {
                "connect_timeout": 10,
                "keepalives": 1,
                "keepalives_idle": 30,
                "keepalives_interval": 10,
                "keepalives_count": 3,
                "options": "-c statement_timeout=60000",
            },
        )
    return create_engine(url, **kwargs)


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False)


def sessions_for(url: str) -> sessionmaker[Session]:
    """A session factory on a new engine for ``url``, for a process that keeps it for life."""
    return make_session_factory(make_engine(url))


@contextmanager
def database(url: str, **engine_kwargs: Any) -> Iterator[sessionmaker[Session]]:
    """A session factory on a new engine for ``url``, disposed of when the block ends."""
    engine = make_engine(url, **engine_kwargs)
    try:
        yield make_session_factory(engine)
    finally:
        engine.dispose()


def insert_for(session: Session, table: Any) -> Insert:
    """An INSERT that supports ``on_conflict_do_update`` on the session's dialect."""
    name = session.get_bind().dialect.name
    if name == "postgresql":
        return postgresql.insert(table)
    if name == "sqlite":
        return sqlite.insert(table)
    raise NotImplementedError(f"upserts are not implemented for {name}")
