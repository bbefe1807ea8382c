"""Fixtures with real parts: a Redis server, databases (SQLite always, PostgreSQL when it is
reachable), the Flask app, a live HTTP server and Celery worker processes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis as redis_lib
from sqlalchemy.orm import Session, sessionmaker

from shared.db import database
from shared.migrate import upgrade
from shared.redis_server import RedisServer, free_port
from shared.settings import Settings, load_settings
from tests.factories import bearer, make_key, with_key
from tests.orthanc import OrthancServer, orthanc_unavailable_reason

REPO = Path(__file__).resolve().parent.parent
DATA_DIR = REPO.parent / "shared" / "data" / "cxr"
PG_ADMIN_URL = os.environ.get(
    "CXR_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


def _pg_admin(statement: str) -> None:
    """One statement on the PostgreSQL server's admin database, outside a transaction
    (``CREATE DATABASE`` cannot run in one)."""
    from sqlalchemy import text

    with (
        database(
            PG_ADMIN_URL, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 2}
        ) as admin,
        admin() as session,
    ):
        session.execute(text(statement))


_pg_state: dict[str, bool] = {}


def postgres_available() -> bool:
    if "ok" not in _pg_state:
        try:
            _pg_admin("SELECT 1")
            _pg_state["ok"] = True
        except Exception:
            _pg_state["ok"] = False
    return _pg_state["ok"]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(free_port(), tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session's Redis, emptied for each test."""
    redis_lib.Redis.from_url(redis_server.url).flushall()
    return redis_server.url


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, migrated database: SQLite always, PostgreSQL where one is reachable."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'cxr.db'}"
        upgrade(url)
        yield url
        return
    if not postgres_available():
        pytest.skip(f"PostgreSQL not reachable at {PG_ADMIN_URL}")
    name = f"cxr_test_{uuid.uuid4().hex[:12]}"
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    _pg_admin(f'CREATE DATABASE "{name}"')
    try:
        upgrade(url)
        yield url
    finally:
        _pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def db_sessions(database_url: str) -> Iterator[sessionmaker[Session]]:
    """Sessions on this test's database (the one its ``settings``, app and workers use)."""
    with database(database_url) as sessions:
        yield sessions


@pytest.fixture
def service_env(tmp_path: Path, database_url: str, redis_url: str) -> dict[str, str]:
    """``CXR_*`` variables for one isolated stack (API, worker and test share them)."""
    return {
        "CXR_DATA_DIR": str(tmp_path / "data"),
        "CXR_DATABASE_URL": database_url,
        "CXR_REDIS_URL": redis_url,
        "CXR_CHUNK_SIZE": "4",
        "CXR_SWEEP_INTERVAL": "1",
        "CXR_ENQUEUE_GRACE_SECONDS": "2",
        "CXR_TASK_TIME_LIMIT": "60",
        "CXR_LEASE_SECONDS": "90",
        "CXR_VISIBILITY_TIMEOUT": "300",
    }


@pytest.fixture
def settings(service_env: dict[str, str]) -> Settings:
    return load_settings(service_env)


@pytest.fixture
def app(settings: Settings):
    from api import create_app

    app = create_app(settings)
    app.config["TESTING"] = True
    yield app
    from api.extensions import service

    with app.app_context():
        service.state.engine.dispose()


@pytest.fixture
def api_key(db_sessions: sessionmaker[Session]) -> str:
    return make_key(db_sessions, "test-hospital")


@pytest.fixture
def auth_headers(api_key: str) -> dict[str, str]:
    return bearer(api_key)


@pytest.fixture
def client(app, api_key: str):
    """A Flask test client that sends the test client's API key."""
    return with_key(app.test_client(), api_key)


@pytest.fixture
def live_server(app) -> Iterator[str]:
    """The app over real HTTP, in a thread."""
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join(5)


class WorkerProcess:
    """A real ``celery worker`` process (prefork pool by default) with its output in a log file."""

    def __init__(
        self,
        env: dict[str, str],
        log_path: Path,
        name: str,
        pool: str | None = None,
        app: str = "worker.celery_app",
    ) -> None:
        from cli.service import worker_argv

        self.log_path = log_path
        argv = worker_argv(1, "INFO", pool=pool, app=app)
        argv[argv.index("-n") + 1] = f"{name}@%h"
        full_env = {**os.environ, **env, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}
        self._log = open(log_path, "ab")  # noqa: SIM115
        self.process = subprocess.Popen(
            argv,
            cwd=REPO,
            env=full_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: see kill_all()
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 120) -> WorkerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited early:\n{self.log()[-3000:]}")
            if " ready." in self.log():
                return self
            time.sleep(0.2)
        raise TimeoutError(f"worker not ready after {timeout}s:\n{self.log()[-3000:]}")

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def children(self) -> list[int]:
        """Pids of the pool processes (Linux: read from /proc)."""
        pids = []
        for stat_file in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat_file.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == self.process.pid:
                pids.append(int(stat_file.parent.name))
        return pids

    def kill_all(self) -> None:
        """SIGKILL the worker and its pool children at once, as a lost host or container."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def signal(self, sig: int) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)

    def stop(self, timeout: float = 60) -> int:
        self.signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)  # no orphaned pool children
        self._log.close()
        return self.process.returncode


@pytest.fixture
def start_worker(
    service_env: dict[str, str], tmp_path: Path
) -> Iterator[Callable[..., WorkerProcess]]:
    """Factory: ``start_worker()`` starts a worker on this test's stack, stopped at teardown."""
    workers: list[WorkerProcess] = []

    def start(
        wait: bool = True, pool: str | None = None, app: str = "worker.celery_app", **extra_env: str
    ) -> WorkerProcess:
        n = len(workers) + 1
        env = {**service_env, **extra_env}
        w = WorkerProcess(env, tmp_path / f"worker-{n}.log", f"w{n}", pool=pool, app=app)
        workers.append(w)
        return w.wait_ready() if wait else w

    yield start
    for w in workers:
        w.stop()


@pytest.fixture
def start_sweeper(
    service_env: dict[str, str], tmp_path: Path
) -> Iterator[Callable[..., subprocess.Popen]]:
    """Factory: a real ``cxr sweeper`` process on this test's stack."""
    procs: list[subprocess.Popen] = []

    def start(**extra_env: str) -> subprocess.Popen:
        log = open(tmp_path / f"sweeper-{len(procs) + 1}.log", "ab")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "sweeper"],
            cwd=REPO,
            env={**os.environ, **service_env, **extra_env},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    if not (DATA_DIR / "manifest.csv").is_file():
        pytest.skip(f"real X-rays not available: {DATA_DIR} is absent (it is not in the repo)")
    return DATA_DIR


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    """A private Orthanc with DICOMweb for the session (a real PACS); skips, saying why, only
    where Orthanc or its DICOMweb plugin cannot be had (.ci/run installs them as root)."""
    reason = orthanc_unavailable_reason()
    if reason:
        pytest.skip(reason)
    server = OrthancServer(tmp_path_factory.mktemp("orthanc")).start()
    yield server
    server.stop()


@pytest.fixture
def pacs(orthanc: OrthancServer) -> Iterator[OrthancServer]:
    """The session's Orthanc, emptied, with the DICOMweb servers a test registered removed."""
    orthanc.clear()
    yield orthanc
    for name in orthanc.get("/dicom-web/servers"):
        orthanc.remove_dicomweb_server(name)
