"""Log lines for people (``CXR_LOG_FORMAT=text``) or for machines (``json``: one object a line),
configured in one place for every process: the API (under gunicorn or Flask's server), the
worker, the sweeper and the CLI.

Invariant: every process sets up logging only through :func:`configure_logging` (gunicorn's
own loggers take :func:`make_formatter`'s formatter), and no line it writes carries an
exception's message: a traceback is rendered as its frames and the exception's type, never its
text (it may quote a filename or a DICOM value), and Celery's task-failure lines name the type
only.  The ids of the work at hand (``request_id``, ``job_id``, ``chunk_id``, ``image_id``) are
bound with :func:`bind` in context variables, so a JSON line carries them without every call
site passing them; they are ours (UUIDs, or a request id checked to be a short safe token), never
patient data.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import traceback
from collections.abc import Mapping
from contextvars import ContextVar
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

from shared.settings import LOG_FORMATS, Settings

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: The ids a line may carry, in the order a JSON line lists them.
ID_FIELDS = ("request_id", "job_id", "chunk_id", "image_id")

# A mapping replaced, never mutated, on each bind: a copied context (a thread, a task) can't
# change its parent's ids.
_ids: ContextVar[Mapping[str, str] | None] = ContextVar("cxr_log_ids", default=None)


def bind(**ids: str | None) -> None:
    """Add ids to the current context (``None`` removes one)."""
    unknown = set(ids) - set(ID_FIELDS)
    if unknown:
        raise ValueError(f"not a log id: {', '.join(sorted(unknown))}")
    merged = {**(_ids.get() or {}), **ids}
    _ids.set({key: value for key, value in merged.items() if value})


def clear() -> None:
    """Forget every bound id (a new request or task starts with none)."""
    _ids.set({})


ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]


def frames_only(exc_info: ExcInfo) -> str:
    """A traceback with its frames and the exception's type, without the exception's message."""
    exc_type, _, tb = exc_info
    frames = "".join(traceback.format_tb(tb))
    return f"Traceback (most recent call last):\n{frames}{exc_type.__name__}"


#: Celery's lines about a failed or retried task quote the exception's repr as ``%(exc)s``.
_CELERY_TRACE = "celery.app.trace"
_CALL_ARGS = re.compile(r"\(.*\)", re.DOTALL)


def _without_exception_text(record: logging.LogRecord) -> None:
    """Keep only the type in Celery's ``exc`` (``ValueError('a.png')`` -> ``ValueError``)."""
    args = record.args
    if record.name != _CELERY_TRACE or not isinstance(args, Mapping) or "exc" not in args:
        return
    if record.exc_info and record.exc_info[0] is not None:
        exc = record.exc_info[0].__name__
    else:  # no exc_info: a repr, or "Retry in 5s: OSError('...')"
        exc = _CALL_ARGS.sub("", str(args["exc"]))
    record.args = {**args, "exc": exc}  # a copy: the task's own context dict stays as it was


class TextFormatter(logging.Formatter):
    """The human format; tracebacks without the exception's message."""

    def __init__(self, fmt: str = TEXT_FORMAT) -> None:
        super().__init__(fmt)

    def format(self, record: logging.LogRecord) -> str:
        _without_exception_text(record)
        return super().format(record)

    def formatException(self, ei: Any) -> str:  # noqa: N802 (logging's name)
        return frames_only(ei)


def _utc_iso(created: float) -> str:
    """``2025-01-31T12:00:00.123Z``"""
    stamp = datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ``time`` (ISO 8601, UTC), ``level``, ``logger``, ``message``,
    the bound ids, and ``http`` (access log) or ``exc_type``/``exc_info`` (frames only) where
    the record has them.  Other attributes (``extra=``) are never copied: Celery's carry the
    exception's text."""

    def format(self, record: logging.LogRecord) -> str:
        _without_exception_text(record)
        entry: dict[str, Any] = {
            "time": _utc_iso(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        context = _ids.get() or {}
        for key in ID_FIELDS:
            value = getattr(record, key, None) or context.get(key)
            if value:
                entry[key] = value
        http = getattr(record, "http", None)
        if isinstance(http, dict):
            entry["http"] = http
        if record.exc_info and record.exc_info[0] is not None:
            entry["exc_type"] = record.exc_info[0].__name__
            entry["exc_info"] = frames_only(record.exc_info)
        if record.stack_info:
            entry["stack_info"] = record.stack_info
        return json.dumps(entry, default=str)


def make_formatter(log_format: str) -> logging.Formatter:
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}")
    return JsonFormatter() if log_format == "json" else TextFormatter()


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (as logging's last resort does), so a
    replaced or captured stderr never leaves it writing to a closed stream."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property
    def stream(self) -> Any:  # type: ignore[override]
        return sys.stderr


def configure_logging(settings: Settings, level: str | int | None = None) -> None:
    """Send the root logger's records to stderr in ``settings.log_format`` at ``level``
    (default ``CXR_LOG_LEVEL``).

    Idempotent (a forked pool child or a second call replaces the handler it added), and, as
    :func:`logging.basicConfig`, it leaves a root logger that something else (a test's log
    capture) has equipped alone."""
    root = logging.getLogger()
    ours = [h for h in root.handlers if isinstance(h, _StderrHandler)]
    if len(ours) != len(root.handlers):
        return
    for handler in ours:
        root.removeHandler(handler)
    handler = _StderrHandler()
    handler.setFormatter(make_formatter(settings.log_format))
    root.addHandler(handler)
    root.setLevel(level or settings.log_level.upper())
    logging.captureWarnings(True)  # a warning is a log line too, in the same format
