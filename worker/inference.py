"""The classifier, loaded once per worker process (never in the Celery parent: TF is not
fork-safe), and reused by every task that process runs."""

from __future__ import annotations

import logging
import threading

from shared.model_store import Classifier
from shared.settings import get_settings

log = logging.getLogger(__name__)

_lock = threading.Lock()
_classifier: Classifier | None = None


def get_classifier() -> Classifier:
    global _classifier
    if _classifier is None:
        with _lock:
            if _classifier is None:
                settings = get_settings()
                _classifier = Classifier.load(settings.model_path, settings.inference_threads)
                log.info("model %s loaded", _classifier.info.version)
    return _classifier
