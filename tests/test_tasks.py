"""The task's error policy: which failures are retried and which fail at once as bugs."""

from __future__ import annotations

import pytest
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError, ProgrammingError

from worker.tasks import is_transient


def _wrap(cls: type[DBAPIError], **kw: bool) -> DBAPIError:
    return cls("UPDATE images ...", {}, Exception("driver said no"), **kw)


@pytest.mark.parametrize(
    "exc",
    [
        _wrap(OperationalError),  # connection refused, server gone, timeout
        _wrap(DBAPIError, connection_invalidated=True),  # a dropped connection, seen mid-query
        OSError("blob store unreachable"),
    ],
)
def test_connection_and_storage_errors_are_retried(exc: BaseException) -> None:
    assert is_transient(exc)


@pytest.mark.parametrize(
    "exc",
    [_wrap(IntegrityError), _wrap(ProgrammingError), _wrap(DBAPIError), ValueError("bug")],
)
def test_integrity_and_programming_errors_fail_at_once(exc: BaseException) -> None:
    assert not is_transient(exc)
