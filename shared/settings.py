"""One typed settings object, read from ``CXR_*`` environment variables and validated at start-up.

Every command (API, worker, CLI, tests) builds its settings through :func:`load_settings`, so the
same variable means the same thing everywhere.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_PATH = REPO_ROOT / "models" / "cxr-cnn.npz"
#: Images declaring more pixels than this are refused from their header, before decoding.
DEFAULT_MAX_PIXELS = 50_000_000
#: CXR_LOG_FORMAT's values (shared/logs.py formats them; it imports this module, not the reverse).
LOG_FORMATS = ("text", "json")


class SettingsError(ValueError):
    """A ``CXR_*`` variable is missing, malformed or inconsistent with another."""


@dataclass(frozen=True)
class Settings:
    """Service configuration. Field ``foo_bar`` is read from ``CXR_FOO_BAR``."""

    data_dir: Path = Path("cxr-data")
    database_url: str = ""  # default: SQLite file in data_dir
    redis_url: str = "redis://127.0.0.1:6379/0"
    blob_dir: Path | None = None  # default: data_dir / "blobs"
    # s3://bucket/prefix: blobs in S3-compatible object storage instead of blob_dir
    blob_url: str = ""
    s3_endpoint_url: str = ""  # MinIO, Ceph, moto; empty: AWS
    s3_region: str = ""
    s3_access_key_id: str = ""
    s3_secret_access_key: str = dataclasses.field(default="", repr=False)
    model_path: Path = DEFAULT_MODEL_PATH
    host: str = "127.0.0.1"
    port: int = 8000
    url: str = "http://127.0.0.1:8000"  # the server the client commands talk to
    api_key: str = dataclasses.field(default="", repr=False)  # the client commands' key
    # embedded Redis started by `cxr serve` when CXR_REDIS_URL is not set
    embedded_redis_port: int = 6390
    # limits
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    max_files_per_job: int = 5000
    max_file_bytes: int = 64 * 1024 * 1024
    max_request_bytes: int = 1024 * 1024 * 1024
    max_zip_ratio: int = 200  # uncompressed / compressed, per zip entry
    max_per_page: int = 500
    # processing
    chunk_size: int = 16  # fairness: a new job waits at most for the chunk in hand (README)
    max_attempts: int = 3
    task_time_limit: int = 300  # seconds, hard limit of one chunk task
    visibility_timeout: int = 3600  # seconds; must stay well above task_time_limit
    lease_seconds: int = 600  # a chunk running longer than this is presumed dead
    # a dispatched chunk still queued this long while the broker holds no message at all lost
    # its message (Redis restarted without persistence): the sweeper sends it again
    enqueue_grace_seconds: int = 60
    sweep_interval: float = 30.0
    retry_backoff_max: int = 60
    worker_concurrency: int = 1
    api_workers: int = 2
    inference_threads: int = 0  # 0: the cores shared out among the pool's processes
    worker_nice: int = 10  # pool processes yield the CPU to the API on a shared machine
    decode_threads: int = 0  # films of a chunk decoded at once; 0: one per core, at most 4
    # fairness (shared/dispatch.py): chunk messages kept waiting in the broker's classification
    # queue; the rest stay in the database until a worker frees a place
    dispatch_depth: int = 1
    # backpressure (api/quotas.py): per client (an API key may override the first two), and
    # for the whole service; refusals ask to retry after quota_retry_after seconds
    max_images_in_flight: int = 20000
    max_submissions_per_minute: int = 120
    max_queue_images: int = 100000
    quota_retry_after: int = 30
    # a pool process whose peak RSS passed this (MiB) is replaced after its chunk; 0: never
    worker_max_memory_mb: int = 3000
    log_level: str = "INFO"
    log_format: str = "text"  # "json": one JSON object a line (shared/logs.py)
    # Every /v1 request needs an API key unless this is set (one-machine, single-user mode only)
    auth_disabled: bool = False
    # the hospital's PACS (DICOMweb): scored DICOM images get a report sent back there
    dicomweb_url: str = ""
    dicomweb_username: str = ""
    dicomweb_password: str = dataclasses.field(default="", repr=False)
    # each worker serves Prometheus metrics on this port (0: off)
    metrics_port: int = 0
    # signed job callbacks (shared/callbacks.py): where they may go besides public addresses
    # (host names, .domains, IPs and CIDRs, comma-separated), how long an undelivered one is
    # retried, and the connect and read timeout of one attempt (seconds)
    callback_allowed_hosts: str = ""
    callback_max_seconds: int = 3600
    callback_timeout: float = 10.0
    # a web UI sign-in lasts this long (seconds), then the reader signs in again
    ui_session_seconds: int = 8 * 3600
    #: the fields whose CXR_* variable was set (``cxr serve`` embeds Redis only if it was not)
    explicit: frozenset[str] = dataclasses.field(default=frozenset(), repr=False, compare=False)

    def is_set(self, name: str) -> bool:
        return name in self.explicit

    @property
    def blob_path(self) -> Path:
        return self.blob_dir if self.blob_dir is not None else self.data_dir / "blobs"

    @property
    def callback_attempt_timeout(self) -> float:
        """CXR_CALLBACK_TIMEOUT, within a quarter of the task's time limit unless set: one
        attempt must end well inside its task (a set value beyond that is refused)."""
        if self.is_set("callback_timeout"):
            return self.callback_timeout
        return min(self.callback_timeout, self.task_time_limit / 4)

    @property
    def sqlalchemy_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'cxr.db').resolve()}"

    def validate(self) -> Settings:
        positive = (
            "port",
            "max_image_pixels",
            "max_files_per_job",
            "max_file_bytes",
            "max_request_bytes",
            "max_zip_ratio",
            "max_per_page",
            "chunk_size",
            "max_attempts",
            "task_time_limit",
            "visibility_timeout",
            "lease_seconds",
            "worker_concurrency",
            "api_workers",
            "enqueue_grace_seconds",
            "retry_backoff_max",
            "embedded_redis_port",
            "ui_session_seconds",
            "callback_max_seconds",
            "dispatch_depth",
            "max_images_in_flight",
            "max_submissions_per_minute",
            "max_queue_images",
            "quota_retry_after",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise SettingsError(f"CXR_{name.upper()} must be > 0")
        self._validate_ranges()
        self._validate_callbacks()
        self._validate_timings()
        self._validate_strings()
        return self

    def _validate_ranges(self) -> None:
        if not (math.isfinite(self.sweep_interval) and self.sweep_interval > 0):
            raise SettingsError("CXR_SWEEP_INTERVAL must be a positive number of seconds")
        if not 0 <= self.worker_nice <= 19:
            raise SettingsError("CXR_WORKER_NICE must be 0 (unchanged) to 19")
        if self.worker_max_memory_mb < 0:
            raise SettingsError("CXR_WORKER_MAX_MEMORY_MB must be 0 (no limit) or more")
        if not 0 <= self.decode_threads <= 64:
            raise SettingsError("CXR_DECODE_THREADS must be 0 (one per core) to 64")
        if not 0 <= self.metrics_port <= 65535:
            raise SettingsError("CXR_METRICS_PORT must be 0 (off) or a port number")
        for name in ("port", "embedded_redis_port"):
            if getattr(self, name) > 65535:
                raise SettingsError(f"CXR_{name.upper()} must be a port number (1-65535)")

    def _validate_timings(self) -> None:
        if self.visibility_timeout < 2 * self.task_time_limit:
            raise SettingsError(
                "CXR_VISIBILITY_TIMEOUT must be at least twice CXR_TASK_TIME_LIMIT, "
                "or Redis redelivers tasks that are still running"
            )
        if self.lease_seconds <= self.task_time_limit:
            raise SettingsError("CXR_LEASE_SECONDS must exceed CXR_TASK_TIME_LIMIT")

    def _validate_callbacks(self) -> None:
        from shared.callbacks import AllowList  # here: settings must not load the models

        # one attempt (resolve, connect, send, read the answer) must end well inside a task
        if not (math.isfinite(self.callback_timeout) and self.callback_timeout > 0):
            raise SettingsError("CXR_CALLBACK_TIMEOUT must be a positive number of seconds")
        if self.is_set("callback_timeout") and self.callback_timeout > self.task_time_limit / 4:
            raise SettingsError("CXR_CALLBACK_TIMEOUT must be at most CXR_TASK_TIME_LIMIT / 4")
        try:
            AllowList.parse(self.callback_allowed_hosts)
        except ValueError as exc:
            raise SettingsError(f"CXR_CALLBACK_ALLOWED_HOSTS: {exc}") from None

    def _validate_strings(self) -> None:
        if not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise SettingsError("CXR_REDIS_URL must be a redis:// URL")
        if self.dicomweb_url and not self.dicomweb_url.startswith(("http://", "https://")):
            raise SettingsError("CXR_DICOMWEB_URL must be an http:// or https:// URL")
        if not self.url.startswith(("http://", "https://")):
            raise SettingsError("CXR_URL must be an http:// or https:// URL")
        if self.log_level.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise SettingsError("CXR_LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR")
        if self.log_format not in LOG_FORMATS:
            raise SettingsError(f"CXR_LOG_FORMAT must be one of {', '.join(LOG_FORMATS)}")
        self._validate_blob_url()

    def _validate_blob_url(self) -> None:
        if self.blob_url and not (
            self.blob_url.startswith("s3://") and self.blob_url[5:].split("/", 1)[0]
        ):
            raise SettingsError("CXR_BLOB_URL must be an s3://bucket[/prefix] URL")
        if self.s3_endpoint_url and not self.s3_endpoint_url.startswith(("http://", "https://")):
            raise SettingsError("CXR_S3_ENDPOINT_URL must be an http:// or https:// URL")


def _convert(name: str, raw: str, kind: type) -> object:
    try:
        if kind is bool:
            if raw.lower() in {"1", "true", "yes", "on"}:
                return True
            if raw.lower() in {"0", "false", "no", "off"}:
                return False
            raise ValueError(raw)
        if kind is Path:
            return Path(raw).expanduser()
        return kind(raw)
    except ValueError as exc:
        raise SettingsError(f"CXR_{name.upper()}={raw!r} is not a valid {kind.__name__}") from exc


_TYPES: dict[str, type] = {
    "data_dir": Path,
    "blob_dir": Path,
    "model_path": Path,
    "database_url": str,
    "redis_url": str,
    "host": str,
    "url": str,
    "api_key": str,
    "dicomweb_url": str,
    "dicomweb_username": str,
    "dicomweb_password": str,
    "blob_url": str,
    "s3_endpoint_url": str,
    "s3_region": str,
    "s3_access_key_id": str,
    "s3_secret_access_key": str,
    "log_level": str,
    "log_format": str,
    "sweep_interval": float,
    "callback_allowed_hosts": str,
    "callback_timeout": float,
    "auth_disabled": bool,
}


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Build and validate settings from ``environ`` (default: ``os.environ``)."""
    env = os.environ if environ is None else environ
    values: dict[str, object] = {}
    for f in dataclasses.fields(Settings):
        if f.name == "explicit":
            continue
        raw = env.get(f"CXR_{f.name.upper()}")
        if raw is None or raw == "":
            continue
        values[f.name] = _convert(f.name, raw, _TYPES.get(f.name, int))
    return Settings(**values, explicit=frozenset(values)).validate()  # type: ignore[arg-type]


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, where the OS tells it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def local_key_file(settings: Settings) -> Path:
    """Where ``cxr serve`` keeps the key it made for the one-machine client (mode 0600)."""
    return settings.data_dir / "local-api-key"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings from the environment, read once."""
    return load_settings()
