"""Service commands: ``serve`` (everything on one machine), ``api``, ``worker``, ``sweeper``,
``db upgrade``."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from typing import TYPE_CHECKING

from cli.supervise import Child, Spawn, Supervisor
from shared.settings import Settings, available_cores, get_settings, local_key_file

if TYPE_CHECKING:
    from shared.redis_server import RedisServer

log = logging.getLogger("cxr.serve")


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the whole service on this machine (Ctrl-C stops it)")
    p.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("api", help="run the HTTP API alone (production: several hosts)")
    p.add_argument("--dev", action="store_true", help="Flask's development server instead")
    p.set_defaults(func=cmd_api)

    p = sub.add_parser("worker", help="run a worker that scores films (start more to go faster)")
    p.add_argument(
        "--concurrency", type=int, help="pool processes (default CXR_WORKER_CONCURRENCY)"
    )
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("sweeper", help="resend work a crashed worker or lost message left behind")
    p.add_argument("--once", action="store_true")
    p.set_defaults(func=cmd_sweeper)

    p = sub.add_parser("db", help="bring the database schema up to date, or show its version")
    p.add_argument("action", choices=("upgrade", "current"))
    p.set_defaults(func=cmd_db)


def cmd_db(args: argparse.Namespace) -> int:
    from alembic import command

    from shared.migrate import alembic_config, upgrade

    settings = get_settings()
    if args.action == "upgrade":
        upgrade(settings.sqlalchemy_url)
        print("database is at the latest revision")
    else:
        command.current(alembic_config(settings.sqlalchemy_url))
    return 0


def cmd_api(args: argparse.Namespace) -> int:
    settings = get_settings()
    if args.dev:
        from api import create_app

        create_app(settings).run(host=settings.host, port=settings.port, threaded=True)
        return 0
    argv = [
        sys.executable,
        "-m",
        "gunicorn",
        "--bind",
        f"{settings.host}:{settings.port}",
        "--workers",
        str(settings.api_workers),
        "--timeout",
        "300",
        "--access-logfile",
        "-",
        "--access-logformat",
        # no query strings; the last field is the request id (X-Request-ID)
        '%(h)s "%(m)s %(U)s" %(s)s %(B)s %(L)ss %({x-request-id}o)s',
        "--logger-class",
        "api.access_log.UidMaskingLogger",  # no DICOM UIDs in paths either
        "api.wsgi:app",
    ]
    os.execv(sys.executable, argv)
    return 0  # not reached


def worker_argv(
    concurrency: int, loglevel: str, pool: str | None = None, app: str = "worker.celery_app"
) -> list[str]:
    """A prefork pool, also for one process: only it enforces the task time limit and survives
    a child that dies.  The parent never imports TensorFlow; each child loads the model in
    ``worker_process_init``."""
    from shared.queue import QUEUE  # here, not at the top: `cxr submit` need not load Celery

    pool = pool or "prefork"
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        app,
        "worker",
        "--pool",
        pool,
        "--concurrency",
        str(concurrency),
        "--loglevel",
        loglevel,
        "-Q",
        QUEUE,
        "--without-gossip",
        "--without-mingle",
        "-n",
        f"cxr-worker-{os.getpid()}@%h",
    ]


def cmd_worker(args: argparse.Namespace) -> int:
    settings = get_settings()
    argv = worker_argv(args.concurrency or settings.worker_concurrency, settings.log_level)
    os.execv(sys.executable, argv)
    return 0  # not reached


class StopOnSignal:
    """True once SIGTERM or SIGINT has arrived: long-running commands finish their round, stop
    their children and exit cleanly instead of dying mid-write."""

    def __init__(self) -> None:
        self.stopping = False
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, *_: object) -> None:
        self.stopping = True

    def __call__(self) -> bool:
        return self.stopping


def cmd_sweeper(args: argparse.Namespace) -> int:
    from worker.sweeper import run_forever, sweep

    settings = get_settings()
    if args.once:
        from shared.db import database
        from shared.queue import make_celery

        with database(settings.sqlalchemy_url) as sessions:
            sent = sweep(make_celery(settings), sessions, settings)
        print(f"re-enqueued {sent} chunk(s)")
        return 0
    run_forever(settings, stop=StopOnSignal())
    return 0


def _ensure_local_key(settings: Settings) -> str:
    """One-machine mode: keys stay on, and a first key is made for the local user.

    It is saved (mode 0600) where the client commands find it, so ``cxr submit`` works at
    once.  Returns the line that tells the user about authentication.
    """
    if settings.auth_disabled:
        log.warning(
            "AUTHENTICATION IS DISABLED (CXR_AUTH_DISABLED): anyone who reaches the port "
            "can submit and read every job"
        )
        return "authentication: DISABLED by CXR_AUTH_DISABLED"
    from shared.auth import create_key
    from shared.db import database

    path = local_key_file(settings)
    if path.is_file():
        return f"authentication: on; local API key in {path}"
    with database(settings.sqlalchemy_url) as sessions, sessions.begin() as session:
        _, plaintext = create_key(session, "local")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(plaintext + "\n")
    return (
        f"authentication: on; created an API key for client 'local' in {path} "
        "(the client commands use it; `cxr keys create` makes more)"
    )


def _children(workers: int, env: dict[str, str], redis: RedisServer | None) -> list[Child]:
    """What ``cxr serve`` runs, each in a session of its own (the supervisor kills a dead
    child's leftovers by its process group; Ctrl-C reaches the supervisor alone, which stops
    them in order)."""
    me = [sys.executable, "-m", "cli.main"]
    if not env.get("CXR_INFERENCE_THREADS"):  # the cores shared out among all the workers
        per = workers * get_settings().worker_concurrency
        env = {**env, "CXR_INFERENCE_THREADS": str(max(1, available_cores() // per))}

    def command(*args: str) -> Spawn:
        return lambda: subprocess.Popen([*me, *args], env=env, start_new_session=True)

    children = []
    if redis is not None:  # already running: started by cmd_serve
        restart = lambda: redis.start().process  # noqa: E731
        children.append(Child("redis", restart, redis.process, time.monotonic(), stop_last=True))
    children += [Child(f"worker-{n + 1}", command("worker")) for n in range(workers)]
    children += [Child("sweeper", command("sweeper")), Child("api", command("api"))]
    return children


def cmd_serve(args: argparse.Namespace) -> int:
    """One machine, no set-up: everything as child processes, stopped together on Ctrl-C."""
    from shared.migrate import upgrade
    from shared.model_store import read_model_info
    from shared.redis_server import RedisServer

    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    info = read_model_info(settings.model_path)  # fail now, not in the first task
    env = dict(os.environ)
    env["CXR_DATA_DIR"] = str(settings.data_dir.resolve())
    redis = None
    if not settings.is_set("redis_url"):
        # started here, not by the supervisor: a port in use is an error to show at once
        redis = RedisServer(settings.embedded_redis_port, settings.data_dir / "redis").start()
        env["CXR_REDIS_URL"] = redis.url
    upgrade(settings.sqlalchemy_url)
    auth_note = _ensure_local_key(settings)
    supervisor = Supervisor(_children(args.workers, env, redis), StopOnSignal())
    code = 0
    try:
        supervisor.start_all()
        print(
            f"cxr-screen running: API http://{settings.host}:{settings.port}  "
            f"model {info.version}  data {settings.data_dir.resolve()}  "
            f"redis {env['CXR_REDIS_URL']}  (Ctrl-C stops everything)\n{auth_note}",
            flush=True,
        )
        code = supervisor.run()
    finally:
        supervisor.stop_all()
        print("cxr-screen stopped", flush=True)
    return code
