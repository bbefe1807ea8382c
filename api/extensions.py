"""Extensions built once at import and bound to an app with ``init_app``.

State lives in ``app.extensions`` (not on the extension object), so several apps with
different settings can live in one process, as they do in the tests.
"""

from __future__ import annotations

from dataclasses import dataclass

from celery import Celery
from flask import Flask, current_app
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from shared.db import make_engine, make_session_factory
from shared.model_store import ModelInfo, read_model_info
from shared.queue import make_celery
from shared.settings import Settings
from shared.storage import BlobStore, blob_store


@dataclass
class ServiceState:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    celery: Celery
    blobs: BlobStore
    model: ModelInfo | None  # the API never loads TensorFlow, only the model's metadata
    model_error: str | None


class Service:
    """Database, queue, blob store and model metadata of one app."""

    key = "cxr"

    def init_app(self, app: Flask, settings: Settings) -> None:
        try:
            info, error = read_model_info(settings.model_path), None
        except Exception as exc:  # reported by /readyz; submissions answer 503
            info, error = None, str(exc)
        engine = make_engine(settings.sqlalchemy_url)
        app.extensions[self.key] = ServiceState(
            settings=settings,
            engine=engine,
            sessions=make_session_factory(engine),
            celery=make_celery(settings, name="cxr-api"),
            blobs=blob_store(settings),
            model=info,
            model_error=error,
        )

    @property
    def state(self) -> ServiceState:
        return current_app.extensions[self.key]


service = Service()
