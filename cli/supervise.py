"""Keeping ``cxr serve``'s parts running: a child that dies is started again, after a backoff.

Invariants:

* every child runs in a process group of its own, and a dead child's group is killed before it
  starts again, so nothing it left behind (a killed Celery parent's pool processes, a killed
  gunicorn master's workers) holds a port, a task or a model's memory;
* a child that dies within ``fast`` seconds of its start ``limit`` times in a row is given up
  on, and the whole service stops with an error: a broken configuration does not restart for
  ever, quietly;
* a signal (Ctrl-C, SIGTERM) stops everything at any moment: the children with SIGTERM (a warm
  shutdown), the embedded Redis after the others.

What became of each child is logged with its name and how it ended (exit code or signal), never
with anything from the work it was doing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("cxr.serve")

Spawn = Callable[[], "subprocess.Popen[bytes]"]


def how_it_ended(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal {-returncode}"
    return f"exit code {returncode}"


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL what is left of a child's process group (the child itself may be gone)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


@dataclass
class Child:
    name: str
    spawn: Spawn  # starts it (in a new session), returns the process
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    fast_deaths: int = 0  # in a row
    restart_at: float | None = None
    stop_last: bool = False  # the embedded Redis: the others need it to shut down cleanly


class Supervisor:
    def __init__(
        self,
        children: list[Child],
        stopping: Callable[[], bool],
        backoff: float = 1.0,
        backoff_max: float = 30.0,
        fast: float = 30.0,
        limit: int = 5,
    ) -> None:
        self.children = children
        self.stopping = stopping
        self.backoff, self.backoff_max = backoff, backoff_max
        self.fast, self.limit = fast, limit

    def _start(self, child: Child) -> None:
        child.restart_at = None
        child.started = time.monotonic()
        try:
            child.proc = child.spawn()
        except Exception as exc:  # e.g. Redis could not bind its port yet: counts as a death
            log.error("%s could not start (%s)", child.name, type(exc).__name__)
            child.proc = None
            self._schedule(child, fast=True)

    def start_all(self) -> None:
        for child in self.children:
            if child.proc is None:  # one started already (the embedded Redis) is watched
                self._start(child)

    def _schedule(self, child: Child, fast: bool) -> None:
        child.fast_deaths = child.fast_deaths + 1 if fast else 0
        delay = min(self.backoff_max, self.backoff * 2 ** max(0, child.fast_deaths - 1))
        child.restart_at = time.monotonic() + delay

    def _died(self, child: Child, proc: subprocess.Popen[bytes]) -> bool:
        """Record a death; False once the child has died fast too many times in a row."""
        kill_group(proc)
        lived = time.monotonic() - child.started
        child.proc = None
        self._schedule(child, fast=lived < self.fast)
        if child.fast_deaths >= self.limit:
            log.error(
                "%s died (%s) %d times in a row within %.0f s of starting: giving up",
                child.name,
                how_it_ended(proc.returncode),
                child.fast_deaths,
                self.fast,
            )
            return False
        log.error(
            "%s died (%s) after %.1f s; restarting it in %.1f s",
            child.name,
            how_it_ended(proc.returncode),
            lived,
            child.restart_at - time.monotonic() if child.restart_at else 0.0,
        )
        return True

    def run(self, poll: float = 0.2) -> int:
        """Until a signal (0), or until a child dies fast too often (1)."""
        while not self.stopping():
            for child in self.children:
                proc = child.proc
                if proc is not None and proc.poll() is not None:
                    if not self._died(child, proc):
                        return 1
                elif proc is None and time.monotonic() >= (child.restart_at or float("inf")):
                    log.info("starting %s again", child.name)
                    self._start(child)
            time.sleep(poll)
        return 0

    def stop_all(self, timeout: float = 30.0) -> None:
        """SIGTERM (a warm shutdown: a worker finishes its chunk), SIGKILL after ``timeout``;
        first every child but those that stop last, then those."""
        for last in (False, True):
            self._stop([c for c in reversed(self.children) if c.stop_last == last], timeout)

    def _stop(self, children: list[Child], timeout: float) -> None:
        running = [c.proc for c in children if c.proc is not None]
        for proc in running:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in running:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("a child did not stop within %.0f s: killing it", timeout)
            kill_group(proc)
            proc.wait()
