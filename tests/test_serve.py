"""The README's run command: `cxr serve` brings up Redis, the migration, a worker, the sweeper
and the API on one machine, and Ctrl-C stops all of it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from cli.main import main
from shared.redis_server import free_port, port_open
from tests.factories import png_bytes
from tests.service_client import wait_for

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent


def test_serve_runs_the_whole_stack_and_stops_on_ctrl_c(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    api_port, redis_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")} | {
        "CXR_DATA_DIR": str(tmp_path / "data"),
        "CXR_PORT": str(api_port),
        "CXR_EMBEDDED_REDIS_PORT": str(redis_port),
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "serve"],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{api_port}"
    try:

        def ready() -> bool:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            return requests.get(f"{url}/readyz", timeout=5).status_code == 200

        try:
            wait_for(ready, 120, "the stack to become ready", interval=0.5)
        except TimeoutError:
            pytest.fail("the stack did not become ready:\n" + (tmp_path / "serve.log").read_text())
        assert port_open(redis_port)  # its own Redis, on the private port
        key_file = tmp_path / "data" / "local-api-key"
        assert key_file.is_file()
        assert oct(key_file.stat().st_mode & 0o777) == "0o600"
        # no key, no access
        assert (
            requests.get(
                f"{url}/v1/jobs/00000000-0000-0000-0000-000000000000", timeout=5
            ).status_code
            == 401
        )

        folder = tmp_path / "films"
        folder.mkdir()
        for n in range(3):
            (folder / f"{n}.png").write_bytes(png_bytes(n))
        for key, value in env.items():  # the client finds the server and the key file
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("CXR_URL", url)
        from shared.settings import get_settings

        get_settings.cache_clear()
        assert main(["submit", str(folder)]) == 0
        job_id = capsys.readouterr().out.strip().splitlines()[-1]
        assert main(["wait", job_id, "--interval", "0.5", "--timeout", "120"]) == 0
        out = capsys.readouterr().out
        assert out.count(" completed ") >= 3
    finally:
        get_settings_cache_clear()
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(60)
        finally:
            log.close()
    assert code == 0
    text = (tmp_path / "serve.log").read_text()
    assert "cxr-screen stopped" in text
    time.sleep(0.5)
    assert not port_open(api_port)
    assert not port_open(redis_port)


def get_settings_cache_clear() -> None:
    from shared.settings import get_settings

    get_settings.cache_clear()


def _child_pid(parent: int, program: str) -> int:
    """The pid of ``parent``'s child whose command line names ``program`` (Linux /proc)."""
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat_file.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat_file.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and program in cmdline:
            return int(stat_file.parent.name)
    raise LookupError(program)


@pytest.mark.fault
def test_serve_restarts_whatever_is_killed_and_the_job_completes(tmp_path: Path) -> None:
    """SIGKILL of the worker's parent, the API's master and the embedded Redis during a job:
    the supervisor starts each again, and every image ends completed, with one result each."""
    api_port, redis_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")} | {
        "CXR_DATA_DIR": str(tmp_path / "data"),
        "CXR_PORT": str(api_port),
        "CXR_EMBEDDED_REDIS_PORT": str(redis_port),
        "CXR_CHUNK_SIZE": "4",
        "CXR_TASK_TIME_LIMIT": "20",
        "CXR_LEASE_SECONDS": "25",
        "CXR_VISIBILITY_TIMEOUT": "60",
        "CXR_SWEEP_INTERVAL": "1",
        "CXR_ENQUEUE_GRACE_SECONDS": "2",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    log_path = tmp_path / "serve.log"
    log = open(log_path, "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "serve"], cwd=REPO, env=env, stdout=log, stderr=log
    )
    url = f"http://127.0.0.1:{api_port}"
    http = requests.Session()

    def ready() -> bool:
        assert proc.poll() is None, log_path.read_text()
        return http.get(f"{url}/readyz", timeout=5).status_code == 200

    def job() -> dict:
        return http.get(f"{url}/v1/jobs/{job_id}", params={"per_page": 100}, timeout=10).json()

    def completed() -> int:
        return job()["counts"]["completed"]

    try:
        wait_for(ready, 120, "the stack to become ready", interval=0.5)
        key = (tmp_path / "data" / "local-api-key").read_text().strip()
        http.headers["Authorization"] = f"Bearer {key}"
        files = [("files", (f"{n}.png", png_bytes(n), "image/png")) for n in range(40)]
        job_id = http.post(f"{url}/v1/jobs", files=files, timeout=60).json()["id"]
        wait_for(completed, 120, "the first results", interval=0.2)

        os.kill(_child_pid(proc.pid, "celery"), signal.SIGKILL)
        wait_for(lambda: "starting worker-1 again" in log_path.read_text(), 30, "a new worker")
        os.kill(_child_pid(proc.pid, "gunicorn"), signal.SIGKILL)
        wait_for(lambda: "starting api again" in log_path.read_text(), 30, "a new API")
        wait_for(ready, 60, "the API to answer again", interval=0.5)
        os.kill(_child_pid(proc.pid, "redis-server"), signal.SIGKILL)
        wait_for(lambda: "starting redis again" in log_path.read_text(), 30, "a new Redis")

        wait_for(
            lambda: job()["status"] in ("completed", "completed_with_errors"),
            240,
            "the job to end",
            interval=1,
        )
        body = job()
        assert body["counts"]["completed"] == 40, body["counts"]
        assert all(i["probability"] is not None for i in body["images"])
        text = log_path.read_text()
        for name, how in (("worker-1", "SIGKILL"), ("api", "SIGKILL"), ("redis", "SIGKILL")):
            assert f"{name} died (signal {how})" in text, name
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(90)
        finally:
            log.close()
    assert code == 0, log_path.read_text()[-3000:]
    from sqlalchemy import create_engine, func, select

    from shared.models import Image, Result

    engine = create_engine(f"sqlite:///{tmp_path / 'data' / 'cxr.db'}")
    with engine.connect() as conn:
        rows = conn.execute(
            select(func.count(Result.image_id), func.count(func.distinct(Result.image_id)))
            .join(Image, Image.id == Result.image_id)
            .where(Image.job_id == job_id)
        ).one()
    assert tuple(rows) == (40, 40)
