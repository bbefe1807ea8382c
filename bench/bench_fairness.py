"""Fairness between clients: a small job's time behind another client's backlog, end to end.

One command (about 2-3 minutes on 2 cores)::

    .venv/bin/python bench/bench_fairness.py [--backlog 2000] [--small 10] [--repeats 5] \
        [--chunk-size 16] [--workers 1] [--no-fifo]

It starts ``python -m cli.main serve --workers N`` in a temp dir (its own SQLite, Redis and API
port: the real API, worker, sweeper and dispatcher) and makes two API keys, clients A and B.
Then, with generated 512x512 PNG films (nothing real):

1. B's job of ``--small`` films on an idle system, ``--repeats`` times (after a warm-up job);
2. A submits ``--backlog`` films (jobs of 500); once two of A's chunks are done (so that the
   one chunk that A's last commit left waiting in the broker was taken), B's job is timed again
   ``--repeats`` times while A's backlog is still queued (how much of A is left is printed for
   each);
3. unless ``--no-fifo``: the same behind a backlog on a second stack with
   ``CXR_DISPATCH_DEPTH=1000000``, where every chunk goes to the broker at its job's commit, as
   before the dispatcher (first come, first served), once.

B's jobs arrive after a random pause of 0.2-1.2 s (a fixed seed), so they find the chunk in a
worker's hands at a random point.  A job's time is the client's: from the start of its POST to
the poll (every 50 ms, the summary alone) that sees it ended.  Printed: each time, the medians,
the ratio behind/idle (the goal: at most 2), how many of A's films were unfinished when B was
sent, A's throughput meanwhile, and the machine (CPU, cores, load average before and after:
other processes on the machine skew every figure).  No dispatch order can shorten the wait
for the chunk already in a worker's hands: ``--chunk-size`` (CXR_CHUNK_SIZE of both stacks)
shows that trade-off.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ml.synthetic import chest_film  # noqa: E402
from shared.redis_server import free_port  # noqa: E402
from shared.settings import Settings, local_key_file  # noqa: E402

TERMINAL = {"completed", "completed_with_errors", "failed"}
POLL = 0.05
A_JOB = 500  # films per job of the backlog
DISTINCT = 64  # distinct generated films the backlog cycles through
#: B's jobs arrive after a random pause (seconds), so that they find A's chunk in hand at a
#: random point, as a client does (a fixed pause falls into step with the chunks)
PAUSE = (0.2, 1.2)
ARRIVAL = random.Random(12345)


def seconds(start: str, end: str) -> float:
    parse = datetime.datetime.fromisoformat
    return (parse(end.replace("Z", "+00:00")) - parse(start.replace("Z", "+00:00"))).total_seconds()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def films(n: int, seed: int, distinct: int | None = None) -> list[tuple[str, bytes]]:
    """``n`` generated films; with ``distinct``, cycling through that many (generating is
    slower than processing)."""
    made: dict[int, bytes] = {}
    out = []
    for k in range(n):
        s = seed + (k % distinct if distinct else k)
        if s not in made:
            ok, buf = cv2.imencode(".png", chest_film(s, height=512, width=512))
            assert ok
            made[s] = buf.tobytes()
        out.append((f"film-{seed}-{k}.png", made[s]))
    return out


class Stack:
    """``cxr serve`` in its own data dir, with keys for the two clients."""

    def __init__(self, tmp: Path, workers: int, name: str, **env: str) -> None:
        self.a_rate = 0.0  # A's films finished per second while B was being timed
        self.waits: list[float] = []  # each timed job's wait: created -> first film started
        self.dir = tmp / name
        self.dir.mkdir(parents=True)
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.env = dict(os.environ)
        for var in ("CXR_REDIS_URL", "CXR_DATABASE_URL", "CXR_API_KEY"):
            self.env.pop(var, None)
        self.env.update(
            CXR_DATA_DIR=str(self.dir),
            CXR_PORT=str(self.port),
            CXR_EMBEDDED_REDIS_PORT=str(free_port()),
            CXR_LOG_LEVEL="WARNING",
        )
        self.env.update(env)
        self.log = (tmp / f"{name}.log").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "serve", "--workers", str(workers)],
            cwd=ROOT,
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self._wait_ready()
        local = local_key_file(Settings(data_dir=self.dir)).read_text().strip()
        self.a, self.b = self.key("bench-a"), self.key("bench-b")
        self.ops = self.session(local)

    def _wait_ready(self) -> None:
        deadline = time.time() + 240
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"cxr serve exited; see {self.log.name}")
            try:
                if requests.get(f"{self.base}/readyz", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            if time.time() > deadline:
                raise RuntimeError("cxr serve not ready after 240 s")
            time.sleep(0.5)

    def key(self, client: str) -> requests.Session:
        out = subprocess.run(
            [sys.executable, "-m", "cli.main", "keys", "create", "--client", client],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return self.session(out.splitlines()[0].strip())

    @staticmethod
    def session(key: str) -> requests.Session:
        http = requests.Session()
        http.headers["Authorization"] = f"Bearer {key}"
        return http

    def submit(self, http: requests.Session, batch: list[tuple[str, bytes]]) -> str:
        files = [("files", (name, data, "image/png")) for name, data in batch]
        r = http.post(f"{self.base}/v1/jobs", files=files, timeout=600)
        r.raise_for_status()
        return r.json()["id"]

    def summary(self, http: requests.Session, job_id: str) -> dict:
        r = http.get(f"{self.base}/v1/jobs/{job_id}", params={"per_page": 0}, timeout=60)
        r.raise_for_status()
        return r.json()

    def timed_job(self, http: requests.Session, batch: list[tuple[str, bytes]]) -> float:
        """Seconds from the start of the POST to the poll that sees the job ended; the
        server's view (created -> first film started) is kept in ``waits``."""
        t0 = time.perf_counter()
        job_id = self.submit(http, batch)
        while (body := self.summary(http, job_id))["status"] not in TERMINAL:
            time.sleep(POLL)
        elapsed = time.perf_counter() - t0
        self.waits.append(seconds(body["created_at"], body["started_at"]))
        return elapsed

    def unfinished(self, http: requests.Session, job_ids: list[str]) -> int:
        total = 0
        for job_id in job_ids:
            counts = self.summary(http, job_id)["counts"]
            total += counts.get("queued", 0) + counts.get("running", 0)
        return total

    def backlog(self, n: int) -> list[str]:
        batch = films(n, seed=10_000, distinct=DISTINCT)
        return [self.submit(self.a, batch[i : i + A_JOB]) for i in range(0, n, A_JOB)]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def behind(stack: Stack, args: argparse.Namespace, repeats: int) -> list[tuple[float, int]]:
    """B's times while A's backlog is queued, with A's unfinished films when B was sent."""
    a_jobs = stack.backlog(args.backlog)
    # The last commit's dispatch left one of A's chunks waiting in the broker's list, as any
    # commit while the worker is busy does: B is timed once the worker has taken it (two of
    # A's chunks done), as a client arriving at a random moment mostly finds it.
    target = stack.unfinished(stack.a, a_jobs) - 2 * args.chunk_size
    while stack.unfinished(stack.a, a_jobs) > target:
        time.sleep(POLL)
    out = []
    started = time.perf_counter()
    for r in range(repeats):
        time.sleep(ARRIVAL.uniform(*PAUSE))
        left = stack.unfinished(stack.a, a_jobs)
        out.append((stack.timed_job(stack.b, films(args.small, seed=2000 + 100 * r)), left))
    done_of_a = out[0][1] - stack.unfinished(stack.a, a_jobs)
    stack.a_rate = done_of_a / (time.perf_counter() - started)
    return out


def run_fair(tmp: Path, args: argparse.Namespace) -> tuple[list[float], list, Stack]:
    stack = Stack(tmp, args.workers, "fair", CXR_CHUNK_SIZE=str(args.chunk_size))
    try:
        stack.timed_job(stack.b, films(args.small, seed=1))  # warm-up: first batch compiles
        stack.waits.clear()
        idle = []
        for r in range(args.repeats):
            time.sleep(ARRIVAL.uniform(*PAUSE))
            idle.append(stack.timed_job(stack.b, films(args.small, seed=1000 + 100 * r)))
        return idle, behind(stack, args, args.repeats), stack
    finally:
        stack.stop()


def run_fifo(tmp: Path, args: argparse.Namespace) -> tuple[float, int]:
    stack = Stack(
        tmp,
        args.workers,
        "fifo",
        CXR_DISPATCH_DEPTH="1000000",
        CXR_CHUNK_SIZE=str(args.chunk_size),
    )
    try:
        stack.timed_job(stack.b, films(args.small, seed=1))
        return behind(stack, args, 1)[0]
    finally:
        stack.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backlog", type=int, default=2000, help="client A's films")
    p.add_argument("--small", type=int, default=10, help="client B's films per job")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--workers", type=int, default=1, help="cxr serve --workers")
    p.add_argument(
        "--chunk-size",
        type=int,
        default=Settings().chunk_size,
        help="CXR_CHUNK_SIZE of the stacks (default: the setting's default)",
    )
    p.add_argument("--no-fifo", action="store_true", help="skip the first-come baseline")
    args = p.parse_args()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="cxr-fair-") as tmp:
        idle, fair, stack = run_fair(Path(tmp), args)
        fifo = None if args.no_fifo else run_fifo(Path(tmp), args)
    load_after = os.getloadavg()
    print(f"machine: {cpu_model()}, {cores} cores, {platform.python_version()}")
    print(
        f"load average before {load_before[0]:.2f} {load_before[1]:.2f}, "
        f"after {load_after[0]:.2f} {load_after[1]:.2f}"
    )
    print(
        f"cxr serve --workers {args.workers}, CXR_CHUNK_SIZE {args.chunk_size}, "
        "CXR_DISPATCH_DEPTH default; "
        f"A: {args.backlog} films (512x512 PNG) in jobs of {A_JOB}; B: {args.small} films a job"
    )
    print("B idle:          " + ", ".join(f"{t:.2f} s" for t in idle))
    print(
        "B behind A:      "
        + ", ".join(f"{t:.2f} s (A had {left} films unfinished)" for t, left in fair)
    )
    idle_median = statistics.median(idle)
    fair_median = statistics.median(t for t, _ in fair)
    print(f"median idle {idle_median:.2f} s, behind A {fair_median:.2f} s")
    idle_waits, fair_waits = stack.waits[: args.repeats], stack.waits[args.repeats :]
    idle_wait, fair_wait = statistics.median(idle_waits), statistics.median(fair_waits)
    print(
        "server's view, B's wait from its commit to its first film started (median): "
        f"idle {idle_wait:.2f} s, behind A {fair_wait:.2f} s"
    )
    print(f"A's throughput while B was timed: {stack.a_rate:.1f} films/s")
    print(f"ratio behind/idle: {fair_median / idle_median:.2f} (goal: at most 2)")
    if fifo is not None:
        t, left = fifo
        print(
            f"first come, first served (CXR_DISPATCH_DEPTH=1000000): B behind A {t:.2f} s "
            f"(A had {left} films unfinished), ratio {t / idle_median:.1f}"
        )


if __name__ == "__main__":
    main()
