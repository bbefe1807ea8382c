"""The real worker app, plus one fault: decoding an image that carries the bytes ``POISON-PILL``
kills the decoding process with SIGKILL (as a decoder crash or the OOM killer would).

Used only by the fault tests: ``celery -A tests.poison_worker worker --pool prefork``.
"""

from __future__ import annotations

import os
import signal

from worker import processing
from worker.celery_app import app

MARKER = b"POISON-PILL"
_real_preprocess_many = processing.preprocess_many


def _preprocess_or_die(datas, *args, **kwargs):
    if any(MARKER in data for data in datas):
        os.kill(os.getpid(), signal.SIGKILL)
    return _real_preprocess_many(datas, *args, **kwargs)


processing.preprocess_many = _preprocess_or_die

__all__ = ["app"]
