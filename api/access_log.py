"""Gunicorn's logs in the service's format, and its access log without DICOM UIDs:
``/dicomweb/studies/{study}`` names a study, and a study UID can lead back to a patient in the
hospital's PACS, so the path is logged with every DICOM UID masked (job and image ids are ours,
and stay).  With ``CXR_LOG_FORMAT=json`` an access line is a JSON object too, with the request
id (``X-Request-ID``) and the request's method, masked path, status, size and duration."""

from __future__ import annotations

import logging
import re
from typing import Any

from gunicorn.glogging import Logger

from shared.logs import configure_logging, make_formatter
from shared.settings import get_settings

#: A DICOM UID: dot-separated numbers (UUIDs have letters and hyphens, so they never match).
DICOM_UID = re.compile(r"(?<![\w.])\d+(?:\.\d+){2,}(?![\w.])")


def mask_uids(path: str) -> str:
    return DICOM_UID.sub("{uid}", path)


def _number(text: Any, kind: type) -> Any:
    try:
        return kind(text)
    except (TypeError, ValueError):
        return None


class AccessFields(logging.Filter):
    """Copies the access line's atoms (already masked) onto the record for the JSON format:
    the request's id comes from the answer's header, as the request's own context is gone by
    the time gunicorn logs it."""

    def filter(self, record: logging.LogRecord) -> bool:
        atoms = record.args
        if isinstance(atoms, dict):
            request_id = atoms.get("{x-request-id}o")
            if request_id and request_id != "-":
                record.request_id = request_id
            record.http = {
                "method": atoms.get("m"),
                "path": atoms.get("U"),
                "status": _number(atoms.get("s"), int),
                "bytes": _number(atoms.get("B"), int),
                "duration_s": _number(atoms.get("L"), float),
            }
        return True


class UidMaskingLogger(Logger):
    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        settings = get_settings()
        configure_logging(settings)  # the app's own loggers, in the workers it forks
        for handler in self.error_log.handlers:
            handler.setFormatter(make_formatter(settings.log_format))
        if settings.log_format == "json":
            for handler in self.access_log.handlers:
                handler.setFormatter(make_formatter("json"))
                handler.addFilter(AccessFields())

    def atoms(self, resp: Any, req: Any, environ: Any, request_time: Any) -> dict[str, Any]:
        atoms = super().atoms(resp, req, environ, request_time)
        for key in ("U", "r"):
            if isinstance(atoms.get(key), str):
                atoms[key] = mask_uids(atoms[key])
        return atoms
