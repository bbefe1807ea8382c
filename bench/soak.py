"""Randomized fault soak: several clients submit many generated films over HTTP to a running
stack while a nemesis injects faults, alone and together; then a checker judges the outcome.

    python bench/soak.py --minutes 10 [--seed S]      # pytest -m soak runs a short one

The stack is real and started here: PostgreSQL where one answers (reached through a proxy that
can be cut; SQLite otherwise), a Redis server, S3 on moto's server (the workers read it through a
second proxy; a local blob directory where moto is absent), the API (gunicorn), workers and the
sweeper.  The soak is their supervisor (``cli.supervise.Supervisor``, as in ``cxr serve``): a
child that dies is started again.  The nemesis kills worker parents and pool processes (SIGKILL,
SIGTERM), pauses a worker past its lease (SIGSTOP, then SIGCONT), restarts Redis with and
without its data (AOF), cuts PostgreSQL, cuts the workers off the blob store, and kills the API.

Invariants:

* the fault schedule is a function of the seed alone (and of which faults this machine can
  make): it is generated up front and printed, so a failing seed replays the same faults at
  the same moments;
* the checker judges from the database and from what the clients were told, in the spirit of
  Jepsen's total-queue checker: every acknowledged job exists once, with every one of its
  images in exactly one terminal state and at most one result row; no job exists that no client
  asked for; every job is terminal within a bound after the last fault healed; and every stored
  probability is the in-process model's for the same bytes (``Classifier`` + ``preprocess``, to
  1e-5), every refusal its refusal.  An image failed with ``too_many_attempts`` after repeated
  kills is a terminal state the service promises; it is counted, not a failure.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import cv2  # noqa: E402
import requests  # noqa: E402
from sqlalchemy import func, select, text  # noqa: E402

from cli.supervise import Child, Supervisor, kill_group  # noqa: E402
from ml.synthetic import chest_film  # noqa: E402
from shared.db import as_utc, database  # noqa: E402
from shared.migrate import upgrade  # noqa: E402
from shared.models import TERMINAL_IMAGE, TERMINAL_JOB, Image, ImageStatus, Job, Result  # noqa: E402
from shared.redis_server import RedisServer, free_port, port_open  # noqa: E402
from shared.settings import Settings  # noqa: E402
from tests.netfault import CuttableProxy  # noqa: E402  the fault harness the tests use

Out = Callable[[str], None]

PG_ADMIN_URL = os.environ.get(
    "CXR_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
#: Short leases so that recovery takes seconds (the settings' invariants still hold).
TIMINGS = {
    "CXR_TASK_TIME_LIMIT": "10",
    "CXR_LEASE_SECONDS": "12",
    "CXR_VISIBILITY_TIMEOUT": "30",
    "CXR_SWEEP_INTERVAL": "1",
    "CXR_ENQUEUE_GRACE_SECONDS": "2",
    "CXR_CHUNK_SIZE": "8",
    "CXR_RETRY_BACKOFF_MAX": "3",
    "CXR_DECODE_THREADS": "1",
    "CXR_INFERENCE_THREADS": "1",
    "CXR_API_WORKERS": "2",
}
LEASE = float(TIMINGS["CXR_LEASE_SECONDS"])
TOLERANCE = 1e-5
#: A client waits at most this long on a Retry-After (the soak's own faults last seconds).
MAX_WAIT = 10.0

WORKER_KINDS = ("worker_kill", "worker_parent_kill", "worker_term", "pool_kill", "pool_term")
KINDS = (
    *WORKER_KINDS,
    "worker_pause",
    "redis_restart_aof",
    "redis_restart_no_aof",
    "postgres_cut",
    "blob_outage",
    "api_kill",
)


# --------------------------------------------------------------------------- the schedule


@dataclass(frozen=True)
class Fault:
    at: float  # seconds after the load started
    kind: str
    duration: float  # seconds until it is healed; 0: a single blow (the supervisor restarts)
    target: int  # the worker it hits, where it hits one

    def __str__(self) -> str:
        lasts = f" for {self.duration:.1f}s" if self.duration else ""
        return f"t+{self.at:6.1f}s {self.kind} (worker {self.target}){lasts}"


def _duration(kind: str, rng: random.Random) -> float:
    if kind == "worker_pause":
        return LEASE + rng.uniform(2, 5)  # past its lease: its chunk is handed to another
    if kind in ("postgres_cut", "blob_outage"):
        return rng.uniform(3, 10)
    if kind.startswith("redis_restart"):
        return rng.uniform(0.5, 4)  # how long Redis stays down
    return 0.0


def make_schedule(
    seed: int, seconds: float, kinds: tuple[str, ...], workers: int, gap: float
) -> list[Fault]:
    """One fault per ``gap`` seconds on average, at moments drawn uniformly from 3 s after the
    load starts to 5 s before it ends (so some overlap); every kind once per round, in an order
    shuffled per round."""
    rng = random.Random(seed)
    count = max(1, int((seconds - 8) / gap))
    moments = sorted(rng.uniform(3, seconds - 5) for _ in range(count))
    faults: list[Fault] = []
    bag: list[str] = []
    for at in moments:
        if not bag:
            bag = rng.sample(list(kinds), len(kinds))
        kind = bag.pop()
        duration = round(_duration(kind, rng), 1)
        faults.append(Fault(round(at, 1), kind, duration, rng.randrange(workers)))
    return faults


# --------------------------------------------------------------------------- films


def film_bytes(seed: int) -> bytes:
    ok, buf = cv2.imencode(".png", chest_film(seed))
    assert ok
    return buf.tobytes()


# --------------------------------------------------------------------------- the stack


def _pool_pids(parent: int) -> list[int]:
    """The pool processes of a Celery parent (Linux: read from /proc)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent:
            pids.append(int(stat.parent.name))
    return pids


def _signal(pid: int, sig: int, group: bool = False) -> bool:
    try:
        (os.killpg if group else os.kill)(pid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


class Switch:
    """A proxy cut while at least one fault holds it (overlapping faults on one path)."""

    def __init__(self, proxy: CuttableProxy) -> None:
        self.proxy, self.holders, self.lock = proxy, 0, threading.Lock()

    @contextlib.contextmanager
    def cut(self) -> Iterator[None]:
        with self.lock:
            self.holders += 1
            self.proxy.cut()
        try:
            yield
        finally:
            with self.lock:
                self.holders -= 1
                if not self.holders:
                    self.proxy.restore()


class Stack:
    """Database, Redis, blob store, API, workers and sweeper, with the handles the nemesis
    needs; the soak supervises the processes."""

    def __init__(self, work: Path, workers: int, out: Out, pg_admin_url: str = PG_ADMIN_URL):
        self.work, self.n_workers, self.out = work, workers, out
        self.pg_admin_url = pg_admin_url
        self.notes: list[str] = []
        self.kinds: tuple[str, ...] = KINDS
        self.pg_name: str | None = None
        self.pg_switch: Switch | None = None
        self.blob_switch: Switch | None = None
        self.moto: subprocess.Popen | None = None
        self.redis_lock = threading.Lock()
        self.stopping = False
        self.supervisor: Supervisor | None = None
        self.proxies: list[CuttableProxy] = []

    # ----------------------------------------------------------------- start and stop

    def start(self) -> Stack:
        (self.work / "logs").mkdir(parents=True, exist_ok=True)
        direct, served = self._database()
        self.database_url = direct
        self.redis = RedisServer(free_port(), self.work / "redis", appendonly=True).start()
        api_blobs, worker_blobs = self._blobs()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("CXR_")},
            **TIMINGS,
            "CXR_DATA_DIR": str(self.work / "data"),
            "CXR_DATABASE_URL": served,
            "CXR_REDIS_URL": self.redis.url,
            "CXR_HOST": "127.0.0.1",
            "CXR_PORT": str(self.port),
            "TF_CPP_MIN_LOG_LEVEL": "2",
            "PYTHONUNBUFFERED": "1",
        }
        me = (sys.executable, "-m", "cli.main")
        children = [Child("api", self._spawn("api", api_blobs, *me, "api"))]
        children += [self._worker(n, worker_blobs) for n in range(self.n_workers)]
        children.append(Child("sweeper", self._spawn("sweeper", api_blobs, *me, "sweeper")))
        # restarts soon and never gives up: the nemesis kills children on purpose
        self.supervisor = Supervisor(
            children, lambda: self.stopping, backoff=0.5, backoff_max=4, fast=5, limit=10**6
        )
        self.supervisor.start_all()
        threading.Thread(target=self.supervisor.run, name="supervisor", daemon=True).start()
        self._wait_ready()
        return self

    def _database(self) -> tuple[str, str]:
        """(the URL the checker uses, the URL the services use: through a cuttable proxy)."""
        from sqlalchemy.engine import make_url

        if self._postgres_answers():
            self.pg_name = f"cxr_soak_{uuid.uuid4().hex[:10]}"
            self._pg_admin(f'CREATE DATABASE "{self.pg_name}"')
            direct = self.pg_admin_url.rsplit("/", 1)[0] + f"/{self.pg_name}"
            upgrade(direct)
            url = make_url(direct)
            proxy = CuttableProxy((url.host or "127.0.0.1", url.port or 5432))
            self.proxies.append(proxy)
            self.pg_switch = Switch(proxy)
            served = url.set(host="127.0.0.1", port=proxy.port)
            return direct, served.render_as_string(hide_password=False)
        self.notes.append(
            f"PostgreSQL does not answer at {self.pg_admin_url}: SQLite instead, and no "
            "postgres_cut fault (a SQLite file cannot become unreachable)"
        )
        self.kinds = tuple(k for k in self.kinds if k != "postgres_cut")
        url = f"sqlite:///{self.work / 'cxr.db'}"
        upgrade(url)
        return url, url

    def _postgres_answers(self) -> bool:
        try:
            self._pg_admin("SELECT 1")
        except Exception:
            return False
        return True

    def _pg_admin(self, statement: str) -> None:
        with (
            database(
                self.pg_admin_url,
                isolation_level="AUTOCOMMIT",
                connect_args={"connect_timeout": 2},
            ) as admin,
            admin() as session,
        ):
            session.execute(text(statement))

    def _blobs(self) -> tuple[dict[str, str], dict[str, str]]:
        """(the API's blob settings, the workers'): S3 on moto's server, the workers through a
        cuttable proxy; a local directory (and no blob_outage) where moto is absent."""
        try:
            import boto3
            import moto.server  # noqa: F401
        except ImportError:
            self.notes.append(
                "moto[server] is not installed: a local blob directory, no blob_outage"
            )
            self.kinds = tuple(k for k in self.kinds if k != "blob_outage")
            return {}, {}
        port = free_port()
        log = open(self.work / "logs" / "moto.log", "ab")  # noqa: SIM115
        self.moto = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        _wait(lambda: port_open(port), 30, "moto's S3 server")
        endpoint = f"http://127.0.0.1:{port}"
        creds = {"region_name": "us-east-1", "aws_access_key_id": "soak"}
        boto3.client(
            "s3", endpoint_url=endpoint, aws_secret_access_key="soak", **creds
        ).create_bucket(Bucket="soak")
        proxy = CuttableProxy(("127.0.0.1", port))
        self.proxies.append(proxy)
        self.blob_switch = Switch(proxy)
        common = {
            "CXR_BLOB_URL": "s3://soak/blobs",
            "CXR_S3_REGION": "us-east-1",
            "CXR_S3_ACCESS_KEY_ID": "soak",
            "CXR_S3_SECRET_ACCESS_KEY": "soak",
        }
        return (
            {**common, "CXR_S3_ENDPOINT_URL": endpoint},
            {**common, "CXR_S3_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}"},
        )

    def _spawn(
        self, name: str, extra: dict[str, str], *argv: str
    ) -> Callable[[], subprocess.Popen]:
        env = {**self.env, **extra}

        def spawn() -> subprocess.Popen:
            with open(self.work / "logs" / f"{name}.log", "ab") as log:
                return subprocess.Popen(
                    list(argv),
                    cwd=ROOT,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # its own group: the supervisor kills what it leaves
                )

        return spawn

    def _worker(self, n: int, blobs: dict[str, str]) -> Child:
        from cli.service import worker_argv

        argv = worker_argv(1, "INFO")
        argv[argv.index("-n") + 1] = f"soak-{n}@%h"
        return Child(f"worker-{n}", self._spawn(f"worker-{n}", blobs, *argv))

    def _wait_ready(self) -> None:
        _wait(lambda: requests.get(f"{self.url}/healthz", timeout=2).ok, 90, "the API")
        for n in range(self.n_workers):
            log = self.work / "logs" / f"worker-{n}.log"
            _wait(
                lambda log=log: "worker.resources: model" in log.read_text(errors="replace"),
                180,
                f"worker {n}",
            )

    def stop(self) -> None:
        self.stopping = True
        if self.supervisor is not None:
            time.sleep(0.5)  # the supervisor's loop sees it and restarts nothing more
            self.supervisor.stop_all(timeout=20)
        if getattr(self, "redis", None) is not None:
            self.redis.stop()
        if self.moto is not None:
            kill_group(self.moto)
            self.moto.wait()
        for proxy in self.proxies:
            proxy.close()

    def drop_database(self) -> None:
        if self.pg_name:
            self._pg_admin(f'DROP DATABASE IF EXISTS "{self.pg_name}" WITH (FORCE)')

    # ----------------------------------------------------------------- what the nemesis hits

    def child(self, name: str, timeout: float = 15) -> subprocess.Popen | None:
        """The running process of a supervised child (waits while it is being restarted)."""
        assert self.supervisor is not None
        (entry,) = [c for c in self.supervisor.children if c.name == name]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.stopping:
            proc = entry.proc
            if proc is not None and proc.poll() is None:
                return proc
            time.sleep(0.1)
        return None

    def restart_redis(self, keep_data: bool, down: float) -> str:
        """Stop Redis and start it again after ``down`` s, with its data (AOF on) or without
        (as a Redis without persistence comes back: empty)."""
        import redis as redis_lib

        with self.redis_lock:
            if keep_data:  # it may be running without AOF since the last restart: turn it on
                client = redis_lib.Redis.from_url(self.redis.url, socket_timeout=5)
                client.config_set("appendonly", "yes")
                _wait(lambda: _aof_written(client), 20, "Redis to write its AOF")
            self.redis.stop()
            if not keep_data:
                for stale in self.redis.directory.glob("appendonly*"):
                    _remove(stale)
            self.redis.appendonly = keep_data
            time.sleep(down)
            self.redis.start()
        return "with its data (AOF)" if keep_data else "without its data"

    def running_images(self) -> set[str]:
        with self.checker_db() as sessions, sessions() as session:
            return set(session.scalars(select(Image.id).where(Image.status == ImageStatus.RUNNING)))

    def checker_db(self):
        return database(self.database_url)


def _aof_written(client) -> bool:
    info = client.info("persistence")
    return info.get("aof_enabled") == 1 and not info.get("aof_rewrite_in_progress")


def _remove(path: Path) -> None:
    import shutil

    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _wait(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if predicate():
                return
        time.sleep(0.2)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


# --------------------------------------------------------------------------- the nemesis


@dataclass
class FaultRecord:
    fault: Fault
    injected: float = 0.0  # wall clock (time.time())
    healed: float = 0.0
    note: str = ""
    skipped: bool = False
    in_flight: set[str] = field(default_factory=set)  # images running when it struck


class Nemesis:
    def __init__(self, stack: Stack, schedule: list[Fault], out: Out) -> None:
        self.stack, self.schedule, self.out = stack, schedule, out
        self.records: list[FaultRecord] = []
        self.threads: list[threading.Thread] = []

    def run(self, t0: float) -> None:
        """Each fault at its moment, in a thread of its own (they overlap)."""
        for fault in self.schedule:
            time.sleep(max(0.0, t0 + fault.at - time.monotonic()))
            record = FaultRecord(fault)
            self.records.append(record)
            thread = threading.Thread(target=self._strike, args=(record,), daemon=True)
            thread.start()
            self.threads.append(thread)

    def join(self) -> None:
        for thread in self.threads:
            thread.join()

    def _strike(self, record: FaultRecord) -> None:
        fault = record.fault
        with contextlib.suppress(Exception):
            record.in_flight = self.stack.running_images()
        record.injected = time.time()
        try:
            record.note = getattr(self, f"_{fault.kind}")(fault)
        except Exception as exc:  # the soak goes on; the summary shows it
            record.note, record.skipped = f"not injected ({type(exc).__name__}: {exc})", True
        if record.note.startswith("skipped"):
            record.skipped = True
        record.healed = max(record.injected, time.time())
        self.out(f"  fault {fault}: {record.note}")

    def _worker_proc(self, fault: Fault) -> subprocess.Popen | None:
        return self.stack.child(f"worker-{fault.target}")

    def _worker_kill(self, fault: Fault) -> str:
        proc = self._worker_proc(fault)
        if proc is None or not _signal(proc.pid, signal.SIGKILL, group=True):
            return "skipped: the worker is down"
        return "SIGKILL to the worker and its pool (a lost host)"

    def _worker_parent_kill(self, fault: Fault) -> str:
        proc = self._worker_proc(fault)
        if proc is None or not _signal(proc.pid, signal.SIGKILL):
            return "skipped: the worker is down"
        return "SIGKILL to the worker's parent"

    def _worker_term(self, fault: Fault) -> str:
        proc = self._worker_proc(fault)
        if proc is None or not _signal(proc.pid, signal.SIGTERM):
            return "skipped: the worker is down"
        return "SIGTERM to the worker's parent (warm shutdown)"

    def _pool(self, fault: Fault, sig: int) -> str:
        proc = self._worker_proc(fault)
        pids: list[int] = []
        deadline = time.monotonic() + 10
        while proc is not None and not pids and time.monotonic() < deadline:
            pids = _pool_pids(proc.pid)
            time.sleep(0.1)
        hit = [pid for pid in pids if _signal(pid, sig)]
        if not hit:
            return "skipped: no pool process"
        return f"{signal.Signals(sig).name} to {len(hit)} pool process(es)"

    def _pool_kill(self, fault: Fault) -> str:
        return self._pool(fault, signal.SIGKILL)

    def _pool_term(self, fault: Fault) -> str:
        return self._pool(fault, signal.SIGTERM)

    def _worker_pause(self, fault: Fault) -> str:
        proc = self._worker_proc(fault)
        if proc is None or not _signal(proc.pid, signal.SIGSTOP, group=True):
            return "skipped: the worker is down"
        time.sleep(fault.duration)
        _signal(proc.pid, signal.SIGCONT, group=True)  # gone meanwhile if another fault killed it
        return f"SIGSTOP for {fault.duration:.1f}s (lease {LEASE:.0f}s), then SIGCONT"

    def _redis_restart_aof(self, fault: Fault) -> str:
        return "restarted " + self.stack.restart_redis(True, fault.duration)

    def _redis_restart_no_aof(self, fault: Fault) -> str:
        return "restarted " + self.stack.restart_redis(False, fault.duration)

    def _postgres_cut(self, fault: Fault) -> str:
        assert self.stack.pg_switch is not None
        with self.stack.pg_switch.cut():
            time.sleep(fault.duration)
        return f"every connection to PostgreSQL cut for {fault.duration:.1f}s"

    def _blob_outage(self, fault: Fault) -> str:
        assert self.stack.blob_switch is not None
        with self.stack.blob_switch.cut():
            time.sleep(fault.duration)
        return f"workers cut off the blob store (S3) for {fault.duration:.1f}s"

    def _api_kill(self, fault: Fault) -> str:
        proc = self.stack.child("api")
        if proc is None or not _signal(proc.pid, signal.SIGKILL, group=True):
            return "skipped: the API is down"
        return "SIGKILL to the API (gunicorn and its workers)"


# --------------------------------------------------------------------------- the clients


@dataclass
class Submission:
    client: str
    key: str  # Idempotency-Key: a retry of this submission returns the same job
    films: list[int]  # film seeds, by position
    job_id: str | None = None
    replayed: bool = False
    refused: str | None = None  # a definite refusal (4xx other than 429)


@dataclass
class ClientStats:
    answers: Counter = field(default_factory=Counter)  # HTTP status (or the error's type)
    polls: Counter = field(default_factory=Counter)  # the same, of GET /v1/jobs/{id}
    replays: int = 0
    anomalies: list[str] = field(default_factory=list)


class SoakClient(threading.Thread):
    """Submits jobs one after another (keeping ``inflight`` unfinished at once), each retried
    with the same Idempotency-Key until it is acknowledged: through 429/503/507 (after their
    Retry-After), connection errors and lost answers."""

    def __init__(self, n: int, key: str, url: str, seed: int, cfg: SoakConfig, stop_at: float):
        super().__init__(name=f"client-{n}", daemon=True)
        self.name_, self.url, self.cfg, self.stop_at = f"soak-client-{n}", url, cfg, stop_at
        self.rng = random.Random(f"{seed}/{n}")
        self.film_base = (n + 1) * 10_000_000
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {key}"
        self.submissions: list[Submission] = []
        self.stats = ClientStats()
        self.sent_films: list[int] = []

    def run(self) -> None:
        open_jobs: list[str] = []
        while time.monotonic() < self.stop_at:
            open_jobs = [j for j in open_jobs if not self._finished(j)]
            if len(open_jobs) >= self.cfg.inflight:
                time.sleep(0.5)
                continue
            sub = self._next()
            self.submissions.append(sub)
            self._submit(sub)
            if sub.job_id:
                open_jobs.append(sub.job_id)

    def _next(self) -> Submission:
        films = []
        for _ in range(self.rng.randint(*self.cfg.job_sizes)):
            if self.sent_films and self.rng.random() < self.cfg.duplicate_rate:
                films.append(self.rng.choice(self.sent_films))  # the same bytes again
            else:
                films.append(self.film_base + len(self.sent_films))
                self.sent_films.append(films[-1])
        return Submission(self.name_, f"{self.name_}-{len(self.submissions)}", films)

    def _submit(self, sub: Submission) -> None:
        files = [("files", (f"{seed}.png", film_bytes(seed))) for seed in sub.films]
        give_up = self.stop_at + 90  # a submission in hand is seen through, within reason
        while time.monotonic() < give_up:
            try:
                resp = self.http.post(
                    f"{self.url}/v1/jobs",
                    files=files,
                    headers={"Idempotency-Key": sub.key},
                    timeout=(5, 60),
                )
            except requests.RequestException as exc:
                self.stats.answers[type(exc).__name__] += 1
                time.sleep(1)
                continue
            self.stats.answers[resp.status_code] += 1
            if self._answered(sub, resp):
                return

    def _answered(self, sub: Submission, resp: requests.Response) -> bool:
        """True once the answer is definite; sleeps as asked otherwise."""
        if resp.status_code in (200, 202):
            body = resp.json()
            sub.job_id, sub.replayed = body["id"], resp.status_code == 200
            self.stats.replays += sub.replayed
            if body.get("image_count") != len(sub.films):
                self.stats.anomalies.append(
                    f"{sub.key}: job {sub.job_id} has {body.get('image_count')} images, "
                    f"{len(sub.films)} sent"
                )
            return True
        if resp.status_code in (429, 503, 507):
            time.sleep(min(MAX_WAIT, float(resp.headers.get("Retry-After") or 1)))
            return False
        code = _error_code(resp)
        if resp.status_code >= 500:  # a bug, not weather: noted, and the retry goes on
            self.stats.anomalies.append(f"{sub.key}: {resp.status_code} {code}")
            time.sleep(1)
            return False
        sub.refused = f"{resp.status_code} {code}"
        self.stats.anomalies.append(f"{sub.key}: refused with {sub.refused}")
        return True

    def _finished(self, job_id: str) -> bool:
        try:
            resp = self.http.get(
                f"{self.url}/v1/jobs/{job_id}", params={"per_page": 0}, timeout=(5, 30)
            )
        except requests.RequestException as exc:
            self.stats.polls[type(exc).__name__] += 1
            return False
        self.stats.polls[resp.status_code] += 1
        if resp.status_code in (429, 503):
            time.sleep(min(MAX_WAIT, float(resp.headers.get("Retry-After") or 1)))
        return resp.ok and resp.json().get("status") in TERMINAL_JOB


def _error_code(resp: requests.Response) -> str:
    try:
        return resp.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return "?"


# --------------------------------------------------------------------------- the checker


@dataclass
class Verdict:
    problems: list[str] = field(default_factory=list)
    statuses: Counter = field(default_factory=Counter)
    codes: Counter = field(default_factory=Counter)
    jobs: int = 0
    images: int = 0
    lost: int = 0
    duplicated: int = 0
    unexpected: int = 0
    wrong: int = 0
    max_diff: float = 0.0


@dataclass(frozen=True)
class Expected:
    sha256: str  # of the bytes sent: the blob key they must be stored under
    outcome: float | str  # the model's probability, or the code that refuses the film


def expected_outcomes(seeds: set[int], out: Out) -> tuple[dict[int, Expected], object]:
    """What the in-process model says of each film (``preprocess`` one film at a time, then
    ``Classifier.predict``), and the model's info."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from shared.imaging import ImageError, preprocess
    from shared.model_store import Classifier
    from shared.settings import DEFAULT_MODEL_PATH

    started = time.monotonic()
    model = Classifier.load(DEFAULT_MODEL_PATH)

    def one(seed: int) -> tuple[int, str, np.ndarray | str]:
        data = film_bytes(seed)
        try:
            prepared = preprocess(data, model.info.preprocess, segmenter=model.segmenter)
        except ImageError as exc:
            prepared = exc.code
        return seed, hashlib.sha256(data).hexdigest(), prepared

    outcomes: dict[int, float | str] = {}
    inputs: dict[int, np.ndarray] = {}
    digests: dict[int, str] = {}
    # OpenCV and the segmenter release the GIL: the stack is stopped, its cores are free
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        for seed, digest, prepared in pool.map(one, sorted(seeds)):
            digests[seed] = digest
            if isinstance(prepared, str):
                outcomes[seed] = prepared
            else:
                inputs[seed] = prepared
    order = list(inputs)
    for start in range(0, len(order), 64):
        batch = order[start : start + 64]
        probs = model.predict(np.stack([inputs[s] for s in batch]))
        outcomes.update(zip(batch, (float(p) for p in probs), strict=True))
    took = time.monotonic() - started
    out(f"checker: the in-process model scored {len(seeds)} films in {took:.0f}s")
    return {s: Expected(digests[s], outcomes[s]) for s in seeds}, model.info


def _rows(database_url: str):
    with database(database_url) as sessions, sessions() as session:
        jobs = session.execute(select(Job.id, Job.client, Job.idempotency_key)).all()
        images = session.execute(
            select(
                Image.id,
                Image.job_id,
                Image.position,
                Image.blob_key,
                Image.status,
                Image.error_code,
                Image.attempts,
                Image.finished_at,
            )
        ).all()
        results = session.execute(
            select(
                Result.image_id,
                func.count(),
                func.max(Result.probability),
                func.max(Result.model_version),
            ).group_by(Result.image_id)
        ).all()
    return jobs, images, {r[0]: r[1:] for r in results}


def check(database_url: str, submissions: list[Submission], max_attempts: int, out: Out) -> Verdict:
    """The total-queue check (see the module's docstring)."""
    verdict = Verdict()
    jobs, images, results = _rows(database_url)
    by_job = {s.job_id: s for s in submissions if s.job_id}
    by_key = {(s.client, s.key): s for s in submissions}
    expected: dict[str, Submission] = {}
    for job_id, client, key in jobs:
        sub = by_job.get(job_id) or by_key.get((client, key))
        if sub is None or (sub.job_id and sub.job_id != job_id):
            verdict.unexpected += 1
            verdict.problems.append(
                f"job {job_id} ({client}, key {key}) exists but was never acknowledged"
            )
            continue
        expected[job_id] = sub
    for job_id in by_job.keys() - {j for j, _, _ in jobs}:
        verdict.lost += len(by_job[job_id].films)
        verdict.problems.append(f"acknowledged job {job_id} is not in the database")
    verdict.jobs = len(expected)
    seeds = {seed for sub in expected.values() for seed in sub.films}
    outcomes, info = expected_outcomes(seeds, out)
    per_job: dict[str, list] = {}
    for row in images:
        per_job.setdefault(row.job_id, []).append(row)
    for job_id, sub in expected.items():
        _check_job(
            verdict, job_id, sub, per_job.get(job_id, []), results, outcomes, info, max_attempts
        )
    return verdict


def _check_job(verdict, job_id, sub, rows, results, outcomes, info, max_attempts) -> None:
    positions = sorted(r.position for r in rows)
    if positions != list(range(len(sub.films))):
        verdict.lost += max(0, len(sub.films) - len(rows))
        verdict.duplicated += max(0, len(rows) - len(sub.films))
        verdict.problems.append(f"job {job_id}: images at {positions}, {len(sub.films)} sent")
    for row in rows:
        if row.position >= len(sub.films):
            continue
        verdict.images += 1
        expected = outcomes[sub.films[row.position]]
        if row.blob_key != expected.sha256:
            verdict.problems.append(f"image {row.id}: its blob is not the bytes sent")
        _check_image(verdict, row, results.get(row.id), expected.outcome, info, max_attempts)


def _check_image(verdict, row, result, expected, info, max_attempts) -> None:
    verdict.statuses[row.status] += 1
    if row.error_code:
        verdict.codes[row.error_code] += 1
    n_results = result[0] if result else 0
    if row.status not in TERMINAL_IMAGE:
        verdict.lost += 1
        verdict.problems.append(f"image {row.id} ended {row.status}, not terminal")
        return
    if n_results > (row.status == ImageStatus.COMPLETED):
        verdict.duplicated += 1
        verdict.problems.append(f"image {row.id} ({row.status}) has {n_results} result rows")
    if row.status == ImageStatus.COMPLETED:
        if n_results != 1:
            verdict.problems.append(f"image {row.id} completed without its result row")
            return
        _, probability, version = result
        diff = abs(probability - expected) if isinstance(expected, float) else float("inf")
        verdict.max_diff = max(verdict.max_diff, diff if diff != float("inf") else 0.0)
        if diff > TOLERANCE or version != info.version:
            verdict.wrong += 1
            verdict.problems.append(
                f"image {row.id}: stored {probability!r} ({version}), the model says {expected!r}"
            )
    elif row.error_code == "too_many_attempts":
        if row.attempts < max_attempts:
            verdict.problems.append(f"image {row.id}: too_many_attempts after {row.attempts}")
    elif row.error_code != expected:
        verdict.wrong += 1
        verdict.problems.append(
            f"image {row.id}: ended {row.status} {row.error_code}, the model says {expected!r}"
        )


# --------------------------------------------------------------------------- the soak


@dataclass
class SoakConfig:
    seconds: float = 55.0  # of load; the faults fall inside it
    seed: int = 0
    workers: int = 2
    clients: int = 3
    fault_gap: float = 4.0  # mean seconds between faults
    job_sizes: tuple[int, int] = (4, 24)
    inflight: int = 3  # unfinished jobs a client keeps at once
    duplicate_rate: float = 0.05  # films sent again (the store keeps one copy of the bytes)
    recovery_bound: float = 120.0  # seconds after the last fault healed for every job to end
    pg_admin_url: str = PG_ADMIN_URL


@dataclass
class SoakReport:
    config: SoakConfig
    schedule: list[Fault]
    records: list[FaultRecord]
    verdict: Verdict
    submissions: list[Submission]
    stats: ClientStats
    notes: list[str]
    recovery_after_last: float | None
    wall: float
    database: str
    blobs: str
    logs: Path

    @property
    def problems(self) -> list[str]:
        return self.verdict.problems + self.stats.anomalies

    def crashes(self) -> Counter:
        """Processes that died of an error of their own, not of a fault (their logs say so):
        the supervisor restarted them, but they are worth knowing about."""
        seen: Counter = Counter()
        for log in sorted(self.logs.glob("*.log")):
            lines = log.read_text(errors="replace").splitlines()
            for line in lines:
                if "Unrecoverable error" in line or " CRITICAL " in line:
                    seen[f"{log.stem}: {line.split(': ', 1)[-1][:100]}"] += 1
        return seen

    def fault_recoveries(self, finished: dict[str, float]) -> list[tuple[float, Fault]]:
        """Per fault: from its healing until every image it caught in flight was terminal."""
        out = []
        for r in self.records:
            ends = [finished[i] for i in r.in_flight if i in finished]
            if not r.skipped and ends:
                out.append((max(0.0, max(ends) - r.healed), r.fault))
        return out

    def failure_message(self) -> str:
        shown = "\n".join(f"  {p}" for p in self.problems[:30])
        more = len(self.problems) - 30
        return (
            f"soak seed {self.config.seed} failed ({len(self.problems)} problems; replay with "
            f"CXR_SOAK_SEED={self.config.seed} pytest -m soak, or python bench/soak.py "
            f"--seconds {self.config.seconds:g} --seed {self.config.seed}; logs in {self.logs}):\n"
            f"{shown}"
            + (f"\n  ... and {more} more" if more > 0 else "")
            + "\nfault schedule:\n"
            + "\n".join(f"  {f}" for f in self.schedule)
        )


def run_soak(cfg: SoakConfig, work: Path, out: Out = print, keep: bool = False) -> SoakReport:
    """The soak in ``work`` (its logs stay there); ``keep`` keeps its PostgreSQL database too."""
    stack = Stack(work, cfg.workers, out, cfg.pg_admin_url)
    try:
        return _soak(cfg, stack, out)
    finally:
        if keep and stack.pg_name:
            out(f"database kept: {stack.database_url}")
        else:
            stack.drop_database()


def _soak(cfg: SoakConfig, stack: Stack, out: Out) -> SoakReport:
    started = time.monotonic()
    try:
        stack.start()
        schedule = make_schedule(cfg.seed, cfg.seconds, stack.kinds, cfg.workers, cfg.fault_gap)
        _announce(cfg, stack, schedule, out)
        clients = _clients(stack, cfg)
        nemesis = Nemesis(stack, schedule, out)
        t0 = time.monotonic()
        for c in clients:
            c.stop_at = t0 + cfg.seconds
            c.start()
        nemesis.run(t0)
        nemesis.join()
        last_heal = max((r.healed for r in nemesis.records), default=time.time())
        for c in clients:
            c.join()
        out(f"load over after {time.monotonic() - t0:.0f}s; waiting for every job to end")
        done_at = _drain(stack, last_heal + cfg.recovery_bound)
    finally:
        stack.stop()
    submissions = [s for c in clients for s in c.submissions]
    verdict = check(stack.database_url, submissions, Settings().max_attempts, out)
    finished = _finished_at(stack.database_url)
    stats = _merge(c.stats for c in clients)
    recovery = None if done_at is None else max(0.0, done_at - last_heal)
    if done_at is None:
        verdict.problems.insert(
            0, f"jobs still unfinished {cfg.recovery_bound:.0f}s after the last fault"
        )
    report = SoakReport(
        cfg,
        schedule,
        nemesis.records,
        verdict,
        submissions,
        stats,
        stack.notes,
        recovery,
        time.monotonic() - started,
        "postgresql (through a cuttable proxy)" if stack.pg_name else "sqlite",
        "s3 on moto (workers through a cuttable proxy)" if stack.moto else "local directory",
        stack.work / "logs",
    )
    out(summary(report, finished))
    return report


def _announce(cfg: SoakConfig, stack: Stack, schedule: list[Fault], out: Out) -> None:
    out(
        f"soak seed {cfg.seed}: {cfg.seconds:g}s of load, {cfg.workers} workers, {cfg.clients} "
        f"clients, API {stack.url}"
    )
    for note in stack.notes:
        out(f"note: {note}")
    out(f"fault schedule ({len(schedule)} faults, from the seed):")
    for fault in schedule:
        out(f"  {fault}")


def _clients(stack: Stack, cfg: SoakConfig) -> list[SoakClient]:
    from shared.auth import create_key

    with stack.checker_db() as sessions, sessions.begin() as session:
        keys = [create_key(session, f"soak-client-{n}")[1] for n in range(cfg.clients)]
    return [SoakClient(n, key, stack.url, cfg.seed, cfg, 0.0) for n, key in enumerate(keys)]


def _drain(stack: Stack, deadline: float) -> float | None:
    """When every image was terminal (wall clock), or None past the deadline."""
    while time.time() < deadline:
        with contextlib.suppress(Exception), stack.checker_db() as sessions, sessions() as session:
            left = session.scalar(
                select(func.count()).select_from(Image).where(Image.status.not_in(TERMINAL_IMAGE))
            )
            if left == 0:
                return time.time()
        time.sleep(0.5)
    return None


def _finished_at(database_url: str) -> dict[str, float]:
    with database(database_url) as sessions, sessions() as session:
        rows = session.execute(select(Image.id, Image.finished_at)).all()
    return {i: as_utc(t).timestamp() for i, t in rows if t is not None}


def _merge(all_stats: Iterator[ClientStats]) -> ClientStats:
    merged = ClientStats()
    for s in all_stats:
        merged.answers.update(s.answers)
        merged.polls.update(s.polls)
        merged.replays += s.replays
        merged.anomalies += s.anomalies
    return merged


def _counts(counter: Counter) -> str:
    return ", ".join(f"{k} x{n}" for k, n in sorted(counter.items(), key=str)) or "none"


def summary(report: SoakReport, finished: dict[str, float]) -> str:
    v = report.verdict
    injected = [r for r in report.records if not r.skipped]
    kinds = Counter(r.fault.kind for r in injected)
    timed = report.fault_recoveries(finished)
    recoveries = [t for t, _ in timed]
    per_fault = (
        f"max {max(recoveries):.1f}s, median {statistics.median(recoveries):.1f}s "
        f"(n={len(recoveries)} faults that caught images in flight); slowest: "
        + "; ".join(f"{t:.1f}s after {f}" for t, f in sorted(timed, key=lambda x: -x[0])[:3])
        if recoveries
        else "n/a (no fault caught an image in flight)"
    )
    by_kind: dict[str, list[float]] = {}
    for t, f in timed:
        by_kind.setdefault(f.kind, []).append(t)
    kind_lines = [
        f"    {kind}: max {max(ts):.1f}s, median {statistics.median(ts):.1f}s (n={len(ts)})"
        for kind, ts in sorted(by_kind.items())
    ]
    last = (
        "never (bound passed)"
        if report.recovery_after_last is None
        else f"{report.recovery_after_last:.1f}s"
    )
    accepted = [s for s in report.submissions if s.job_id]
    lines = [
        f"soak seed {report.config.seed} summary",
        f"  stack: database {report.database}; blob store {report.blobs}",
        f"  faults injected: {len(injected)} of {len(report.records)} scheduled: "
        + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())),
        f"  jobs: {len(accepted)} acknowledged ({report.stats.replays} by a replay: the first "
        f"answer was lost), {v.jobs} in the database",
        f"  images: {v.images} ("
        + ", ".join(f"{s} {n}" for s, n in sorted(v.statuses.items()))
        + (f"; codes: {dict(v.codes)}" if v.codes else "")
        + ")",
        f"  lost {v.lost}, duplicated {v.duplicated}, unexpected jobs {v.unexpected}, "
        f"wrong outcomes {v.wrong} (max |stored - model| {v.max_diff:.1e})",
        f"  submissions answered: {_counts(report.stats.answers)}; polls answered: "
        f"{_counts(report.stats.polls)}",
        f"  recovery per fault: {per_fault}",
        *kind_lines,
        f"  every job terminal {last} after the last fault healed",
        f"  crashes not injected (from the logs): {_counts(report.crashes())}",
        f"  wall time {report.wall:.0f}s; problems: {len(report.problems)}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, help="minutes of load (default 1)")
    parser.add_argument("--seconds", type=float, help="seconds of load, instead of --minutes")
    parser.add_argument("--seed", type=int, help="default: a random one (printed)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--fault-gap", type=float, default=4.0, help="mean seconds between faults")
    parser.add_argument(
        "--keep", action="store_true", help="keep the work directory (logs) and the database"
    )
    args = parser.parse_args(argv)
    seconds = args.seconds or 60 * (args.minutes or 1)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1_000_000)
    cfg = SoakConfig(
        seconds=seconds,
        seed=seed,
        workers=args.workers,
        clients=args.clients,
        fault_gap=args.fault_gap,
    )
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    work = Path(tempfile.mkdtemp(prefix=f"cxr-soak-{seed}-"))
    report = run_soak(cfg, work, out=lambda line: print(line, flush=True), keep=args.keep)
    if report.problems:
        print(report.failure_message(), flush=True)  # the logs are kept
        return 1
    if not args.keep:
        _remove(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
