"""Gunicorn's access log without DICOM UIDs: ``/dicomweb/studies/{study}`` names a study, and a
study UID can lead back to a patient in the hospital's PACS, so the path is logged with every
DICOM UID masked (job and image ids are ours, and stay)."""

from __future__ import annotations

import re
from typing import Any

from gunicorn.glogging import Logger

#: A DICOM UID: dot-separated numbers (UUIDs have letters and hyphens, so they never match).
DICOM_UID = re.compile(r"(?<![\w.])\d+(?:\.\d+){2,}(?![\w.])")


def mask_uids(path: str) -> str:
    return DICOM_UID.sub("{uid}", path)


class UidMaskingLogger(Logger):
    def atoms(self, resp: Any, req: Any, environ: Any, request_time: Any) -> dict[str, Any]:
        atoms = super().atoms(resp, req, environ, request_time)
        for key in ("U", "r"):
            if isinstance(atoms.get(key), str):
                atoms[key] = mask_uids(atoms[key])
        return atoms
