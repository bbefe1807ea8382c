"""The supervisor of ``cxr serve``, on real (tiny) child processes: restarts, backoff, giving up,
and the leftovers of a dead child."""

from __future__ import annotations

import itertools
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from cli.supervise import Child, Supervisor
from tests.service_client import wait_for


def python(code: str):
    return lambda: subprocess.Popen([sys.executable, "-c", code], start_new_session=True)


class Counting:
    """A spawn that counts its calls."""

    def __init__(self, spawn) -> None:
        self.spawn, self.calls = spawn, 0

    def __call__(self):
        self.calls += 1
        return self.spawn()


def test_a_child_that_dies_is_started_again_and_its_death_is_logged(caplog) -> None:
    spawn = Counting(python("import os, signal; os.kill(os.getpid(), signal.SIGKILL)"))
    supervisor = Supervisor(
        [Child("victim", spawn)], lambda: spawn.calls >= 3, backoff=0.01, fast=0.0, limit=99
    )
    with caplog.at_level(logging.INFO, logger="cxr.serve"):
        supervisor.start_all()
        assert supervisor.run(poll=0.01) == 0
    supervisor.stop_all(timeout=5)
    assert spawn.calls == 3
    assert "victim died (signal SIGKILL)" in caplog.text


def test_a_child_that_keeps_dying_at_once_is_given_up_on(caplog) -> None:
    spawn = Counting(python("raise SystemExit(3)"))
    supervisor = Supervisor([Child("broken", spawn)], lambda: False, backoff=0.01, limit=3)
    supervisor.start_all()
    assert supervisor.run(poll=0.01) == 1
    assert spawn.calls == 3
    assert "broken died (exit code 3) 3 times in a row" in caplog.text


def test_backoff_doubles_between_fast_deaths() -> None:
    spawn = Counting(python("raise SystemExit(1)"))
    starts: list[float] = []

    def timed():
        starts.append(time.monotonic())
        return spawn()

    supervisor = Supervisor([Child("c", timed)], lambda: False, backoff=0.2, limit=4)
    supervisor.start_all()
    assert supervisor.run(poll=0.01) == 1
    gaps = [round(b - a, 2) for a, b in itertools.pairwise(starts)]
    assert [g >= want for g, want in zip(gaps, (0.2, 0.4, 0.8), strict=True)] == [True] * 3, gaps


def test_what_a_dead_child_left_behind_is_killed_with_it(tmp_path: Path) -> None:
    """As a killed Celery parent leaves its pool processes: they must not live on."""
    pid_file = tmp_path / "orphan.pid"
    code = (
        "import subprocess, sys; "
        f"p = subprocess.Popen(['sleep', '300']); open({str(pid_file)!r}, 'w').write(str(p.pid)); "
        "sys.exit(1)"
    )
    spawn = Counting(python(code))
    supervisor = Supervisor([Child("parent", spawn)], lambda: spawn.calls >= 2, backoff=0.01)
    supervisor.start_all()
    wait_for(pid_file.exists, 10, "the child to start its own child")
    orphan = int(pid_file.read_text())
    assert supervisor.run(poll=0.01) == 0
    supervisor.stop_all(timeout=5)

    def gone() -> bool:
        try:
            stat = Path(f"/proc/{orphan}/stat").read_text()
        except OSError:
            return True
        return stat.rsplit(")", 1)[1].split()[0] == "Z"  # a zombie is dead

    wait_for(gone, 10, "the orphan to be killed")


def test_stop_all_ends_every_child_the_one_marked_last_after_the_others(tmp_path) -> None:
    """A warm shutdown: SIGTERM, and the embedded Redis only once the others have exited."""

    def child(name: str, linger: float):
        return python(
            "import signal, sys, time\n"
            "def bye(*_):\n"
            f"    time.sleep({linger})\n"
            f"    open({str(tmp_path / name)!r}, 'w').write(repr(time.time()))\n"
            "    sys.exit(0)\n"
            "signal.signal(signal.SIGTERM, bye)\n"
            "time.sleep(60)\n"
        )

    children = [Child("redis", child("redis", 0), stop_last=True), Child("api", child("api", 0.5))]
    supervisor = Supervisor(children, lambda: True)
    supervisor.start_all()
    procs = [c.proc for c in children]
    time.sleep(0.5)  # the handlers are installed
    supervisor.stop_all(timeout=10)
    assert all(p is not None and p.returncode == 0 for p in procs)
    assert float((tmp_path / "redis").read_text()) > float((tmp_path / "api").read_text())
    assert not any(_alive(p.pid) for p in procs if p is not None)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
