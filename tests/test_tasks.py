"""The task's error policy: which failures are retried and which fail at once as bugs."""

from __future__ import annotations

import os

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


def test_a_per_process_resource_is_built_once_under_many_threads() -> None:
    import threading
    import time

    from worker.resources import per_process

    builds: list[int] = []

    @per_process
    def resource() -> object:
        builds.append(1)
        time.sleep(0.05)  # wide enough for every thread to arrive while it is being built
        return object()

    seen: list[object] = []
    threads = [threading.Thread(target=lambda: seen.append(resource())) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1
    assert len({id(x) for x in seen}) == 1


def test_a_forked_child_builds_its_own_resource() -> None:
    from worker.resources import per_process

    @per_process
    def resource() -> int:
        return os.getpid()

    assert resource() == os.getpid()  # the parent holds one...
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report what it got, and leave without running pytest's exit
        os.write(write_end, f"{resource()} {os.getpid()}".encode())
        os._exit(0)
    os.close(write_end)
    got, child_pid = map(int, os.read(read_end, 64).split())
    os.waitpid(pid, 0)
    assert got == child_pid != os.getpid()  # ...and the child never reuses it


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_pool_processes_yield_the_cpu_and_the_parent_does_not(start_worker) -> None:
    """CXR_WORKER_NICE lowers the priority of the processes that run the model, only."""
    worker = start_worker(CXR_WORKER_NICE="7")
    parent = os.getpriority(os.PRIO_PROCESS, worker.process.pid)
    children = worker.children()
    assert children
    assert [os.getpriority(os.PRIO_PROCESS, pid) - parent for pid in children] == [7] * len(
        children
    )
    assert parent == os.getpriority(os.PRIO_PROCESS, 0)
