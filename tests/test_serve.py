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
