"""What a worker process builds once and keeps: its database sessions, blob store, model and
PACS client.

Invariant: each is built lazily, in the process that uses it (never inherited across a fork:
TensorFlow and database connections do not survive one), at most once per process even under a
threaded pool, and only through :func:`per_process`.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

from dicomweb_client import DICOMwebClient
from sqlalchemy.orm import Session, sessionmaker

from shared.db import sessions_for
from shared.dicomweb import pacs_client
from shared.model_store import Classifier, ModelFileError, ModelInfo, read_model_info
from shared.settings import Settings, available_cores, get_settings
from shared.storage import BlobStore, blob_store

log = logging.getLogger(__name__)

T = TypeVar("T")


class _PerProcess(Generic[T]):
    def __init__(self, build: Callable[[], T]) -> None:
        self._build = build
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._value: T | None = None
        functools.update_wrapper(self, build)

    def __call__(self) -> T:
        pid = os.getpid()
        if self._pid != pid:
            with self._lock:
                if self._pid != pid:  # a forked child rebuilds what its parent held
                    self._value = self._build()
                    self._pid = pid
        return self._value  # type: ignore[return-value]


def per_process(build: Callable[[], T]) -> Callable[[], T]:
    """``build()`` once per process, on first call."""
    return _PerProcess(build)


@per_process
def sessions() -> sessionmaker[Session]:
    return sessions_for(get_settings().sqlalchemy_url)


@per_process
def blobs() -> BlobStore:
    return blob_store(get_settings())


def inference_threads(settings: Settings) -> int:
    """TensorFlow's intra-op threads in one pool process: unless set, the cores shared out
    among the pool's processes (each would otherwise start one thread per core, and N
    processes on the same cores spend their time preempting each other)."""
    return settings.inference_threads or max(1, available_cores() // settings.worker_concurrency)


@per_process
def classifier() -> Classifier:
    settings = get_settings()
    loaded = Classifier.load(settings.model_path, inference_threads(settings))
    log.info("model %s loaded", loaded.info.version)
    return loaded


@per_process
def pacs() -> DICOMwebClient | None:
    """The PACS's DICOMweb client; None when ``CXR_DICOMWEB_URL`` is not set."""
    return pacs_client(get_settings())


@per_process
def model_info() -> ModelInfo | None:
    """The configured model's metadata (threshold, version) without TensorFlow, for workers
    that only send reports; None when it cannot be read (the report then omits the threshold)."""
    try:
        return read_model_info(get_settings().model_path, verify=False)
    except ModelFileError as exc:
        log.warning(
            "model metadata unreadable (%s): reports omit the threshold", type(exc).__name__
        )
        return None
