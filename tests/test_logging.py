"""Structured logs (shared/logs.py): JSON lines from the API under gunicorn and from a real
Celery worker carry the request, job and chunk ids; a hostile X-Request-ID is replaced; and a
filename never reaches a log line, in either format."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from shared.logs import JsonFormatter, TextFormatter
from shared.redis_server import free_port
from shared.settings import SettingsError, load_settings
from tests.factories import bearer, png_bytes, png_declaring, submit, truncated, zip_bytes
from tests.service_client import wait_done, wait_for

REPO = Path(__file__).resolve().parent.parent
#: Stands for a patient's name in a filename: it must never be logged.
MARKER = "DOE-JANE-MRN-7731"
TOKEN = re.compile(r"[A-Za-z0-9._-]{1,64}")

# one database is enough here: the logs do not depend on it
sqlite_only = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


#: Lines written past Python's logging, straight to the file descriptor: TensorFlow's native
#: start-up notices and Celery's shutdown notice (README, Settings: CXR_LOG_FORMAT).
FOREIGN = re.compile(
    r"WARNING: All log messages before absl::InitializeLog|[IWE]\d{4} [\d:. ]+\d+ \S+:\d+\]"
    r"|worker: (Warm|Cold) shutdown \(MainProcess\)$"
)


def json_lines(text: str, foreign: re.Pattern[str] | None = None) -> list[dict]:
    """Every non-empty line as a JSON object (fails on any line that is not one), but those
    ``foreign`` matches."""
    lines = [line for line in text.splitlines() if line.strip()]
    lines = [line for line in lines if not (foreign and foreign.match(line))]
    parsed = []
    for line in lines:
        try:
            parsed.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"not a JSON line: {line[:300]!r}")
    return parsed


class ApiProcess:
    """``cxr api`` (gunicorn, one worker) with stdout and stderr in one file."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.url = f"http://127.0.0.1:{env['CXR_PORT']}"
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "api"],
            cwd=REPO,
            env={**os.environ, **env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self) -> ApiProcess:
        def up() -> bool:
            assert self.process.poll() is None, self.log()
            return requests.get(f"{self.url}/healthz", timeout=5).status_code == 200

        wait_for(up, 60, "the API to start", interval=0.2)
        return self

    def stop(self) -> str:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()
        return self.log()


@pytest.fixture
def start_api(service_env: dict[str, str], tmp_path: Path) -> Iterator[Callable[..., ApiProcess]]:
    procs: list[ApiProcess] = []

    def start(**extra_env: str) -> ApiProcess:
        env = {**service_env, "CXR_PORT": str(free_port()), "CXR_API_WORKERS": "1", **extra_env}
        proc = ApiProcess(env, tmp_path / f"api-{len(procs) + 1}.log")
        procs.append(proc)
        return proc.wait_ready()

    yield start
    for proc in procs:
        if proc.process.poll() is None:
            proc.stop()


def test_log_format_is_validated() -> None:
    assert load_settings({}).log_format == "text"
    assert load_settings({"CXR_LOG_FORMAT": "json"}).log_format == "json"
    with pytest.raises(SettingsError, match="CXR_LOG_FORMAT"):
        load_settings({"CXR_LOG_FORMAT": "xml"})


def _record_with_exception(message: str, name: str = "test") -> logging.LogRecord:
    try:
        raise ValueError(message)
    except ValueError:
        return logging.LogRecord(name, logging.ERROR, __file__, 1, "failed", (), sys.exc_info())


@pytest.mark.parametrize("formatter", [JsonFormatter(), TextFormatter()], ids=["json", "text"])
def test_a_logged_exception_shows_its_frames_and_type_never_its_message(formatter) -> None:
    line = formatter.format(_record_with_exception(f"cannot open {MARKER}.png"))
    assert "_record_with_exception" in line  # the frame
    assert "ValueError" in line
    assert MARKER not in line


def test_celery_task_failure_lines_name_the_exception_type_only() -> None:
    record = _record_with_exception(f"{MARKER}.png", name="celery.app.trace")
    context = {"name": "cxr.classify_chunk", "id": "t1", "description": "raised unexpected"}
    record.msg = "Task %(name)s[%(id)s] %(description)s: %(exc)s"
    record.args = {**context, "exc": f"ValueError('{MARKER}.png')"}
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "Task cxr.classify_chunk[t1] raised unexpected: ValueError"
    assert MARKER not in json.dumps(entry)


@sqlite_only
@pytest.mark.parametrize(
    "hostile",
    ["abc\nlevel=ERROR fake line", "x" * 200, 'a"b', "", "café"],
    ids=["newline", "200 chars", "quote", "empty", "non-ascii"],
)
def test_a_hostile_request_id_is_replaced_by_a_generated_one(client, hostile: str) -> None:
    # through the WSGI environ: a test client's headers refuse a newline themselves
    resp = client.get("/healthz", environ_overrides={"HTTP_X_REQUEST_ID": hostile})
    echoed = resp.headers["X-Request-ID"]
    assert echoed != hostile
    assert TOKEN.fullmatch(echoed)


@sqlite_only
def test_a_safe_request_id_is_echoed_and_a_missing_one_generated(client) -> None:
    assert client.get("/healthz", headers={"X-Request-ID": "lb-4f2.a_9"}).headers[
        "X-Request-ID"
    ] == ("lb-4f2.a_9")
    first, second = (client.get("/healthz").headers["X-Request-ID"] for _ in range(2))
    assert TOKEN.fullmatch(first)
    assert first != second


@pytest.mark.integration
@sqlite_only
def test_api_json_lines_carry_the_request_id_and_the_job_id(start_api, api_key) -> None:
    api = start_api(CXR_LOG_FORMAT="json")
    headers = {**bearer(api_key), "X-Request-ID": "req-json-1"}
    resp = requests.post(
        f"{api.url}/v1/jobs",
        files=[("files", ("a.png", png_bytes(1)))],
        headers=headers,
        timeout=60,
    )
    assert resp.status_code == 202, resp.text
    assert resp.headers["X-Request-ID"] == "req-json-1"
    job_id = resp.json()["id"]
    uid_path = "/dicomweb/studies/1.2.826.0.1.3680043.8.498.1"
    requests.get(f"{api.url}{uid_path}", headers={"X-Request-ID": "req-json-2"}, timeout=10)

    lines = json_lines(api.stop())
    of_request = [e for e in lines if e.get("request_id") == "req-json-1"]
    assert any(e.get("job_id") == job_id and e["logger"] == "api.jobs" for e in of_request)
    access = [e for e in of_request if e["logger"] == "gunicorn.access"]
    assert [e["http"]["status"] for e in access] == [202]
    for entry in lines:
        assert {"time", "level", "logger", "message"} <= entry.keys()
        assert entry["time"].endswith("Z")
    masked = [e for e in lines if e.get("request_id") == "req-json-2"]
    assert [e["http"]["path"] for e in masked] == ["/dicomweb/studies/{uid}"]
    assert "1.2.826.0.1.3680043" not in json.dumps(lines)


@pytest.mark.integration
@sqlite_only
def test_a_worker_logs_json_lines_with_the_chunk_and_job_ids(
    client, start_worker, db_sessions
) -> None:
    from shared.models import Chunk

    job_id = submit(client, [("a.png", png_bytes(1)), ("b.png", png_bytes(2))])["id"]
    worker = start_worker(CXR_LOG_FORMAT="json")
    wait_for(
        lambda: client.get(f"/v1/jobs/{job_id}").get_json()["status"] == "completed",
        120,
        "the job to complete",
    )
    worker.stop()
    with db_sessions() as session:
        (chunk_id,) = session.query(Chunk.id).filter_by(job_id=job_id).one()
    lines = json_lines(worker.log(), foreign=FOREIGN)
    done = [e for e in lines if e.get("chunk_id") == chunk_id and "completed" in e["message"]]
    assert done, worker.log()[-3000:]
    assert all(e.get("job_id") == job_id for e in done)


@pytest.mark.integration
@sqlite_only
@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_filename_never_appears_in_any_log_line(
    start_api, start_worker, api_key, log_format: str
) -> None:
    api = start_api(CXR_LOG_FORMAT=log_format)
    worker = start_worker(CXR_LOG_FORMAT=log_format)
    files = [
        (f"{MARKER}.png", png_bytes(3)),
        (f"{MARKER}-cut.png", truncated(png_bytes(4))),  # fails at submission
        (f"{MARKER}-bad.png", png_declaring(300, 300)),  # a sound header: fails in the worker
        (f"{MARKER}.zip", zip_bytes({f"{MARKER}/in-zip.png": png_bytes(5)})),
    ]
    http = requests.Session()
    http.headers.update(bearer(api_key))
    resp = http.post(f"{api.url}/v1/jobs", files=[("files", item) for item in files], timeout=60)
    assert resp.status_code == 202, resp.text
    job = wait_done(http, api.url, resp.json()["id"], timeout=120)
    http.get(f"{api.url}/v1/jobs/{job['id']}/results.csv", timeout=10)
    # a refused submission: its error message names the entry, its log lines must not
    unsafe = zip_bytes({f"../{MARKER}.png": png_bytes(6)})
    resp = http.post(f"{api.url}/v1/jobs", files=[("files", ("u.zip", unsafe))], timeout=60)
    assert resp.status_code == 400
    worker.stop()
    logged = api.stop() + worker.log()
    assert job["id"] in logged  # the logs are there
    assert MARKER not in logged
