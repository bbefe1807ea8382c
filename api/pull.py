"""``POST /v1/jobs`` with a JSON body: a job whose images a worker pulls from the PACS.

``{"dicomweb": {"study_uids": [...]}}`` or ``{"dicomweb": {"query": {...}}}`` (QIDO-RS).  The
API only validates and records the request; a worker searches (QIDO-RS) and retrieves
(WADO-RS) the instances, so large batches never pass through the API.  Invariant: what is
recorded identifies no patient: study UIDs, or a query on the few study attributes in
:data:`QUERY_KEYS` (no names, ids, birth dates or accession numbers).
"""

from __future__ import annotations

import json
import re
from typing import Any

from flask import request

from api.errors import APIError, ErrorCode

MAX_STUDIES = 1000
UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
#: QIDO-RS study attributes a pull may filter on: none of them names a patient.
QUERY_KEYS = frozenset({"StudyDate", "StudyTime", "ModalitiesInStudy", "StudyInstanceUID"})
QUERY_VALUE = re.compile(r"^[0-9A-Za-z.,\-\\*]{1,64}$")


def _invalid(message: str) -> APIError:
    return APIError(ErrorCode.INVALID_PARAMETER, message)


def _study_uids(raw: Any) -> list[str]:
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_STUDIES:
        raise _invalid(f"dicomweb.study_uids must be a list of 1 to {MAX_STUDIES} UIDs")
    for uid in raw:
        if not (isinstance(uid, str) and len(uid) <= 64 and UID.match(uid)):
            raise _invalid("dicomweb.study_uids holds a value that is not a DICOM UID")
    return list(dict.fromkeys(raw))


def _query(raw: Any) -> dict[str, str]:
    if not isinstance(raw, dict) or not raw:
        raise _invalid("dicomweb.query must be a non-empty object of QIDO-RS attributes")
    refused = sorted(set(raw) - QUERY_KEYS)
    if refused:
        raise _invalid(
            f"dicomweb.query may filter on {', '.join(sorted(QUERY_KEYS))} only "
            f"(not {', '.join(refused)[:200]}): a pull never searches by patient"
        )
    for key, value in raw.items():
        if not (isinstance(value, str) and QUERY_VALUE.match(value)):
            raise _invalid(f"dicomweb.query.{key} must be a short DICOM match value")
    return dict(raw)


def pull_request() -> str:
    """The validated request, as the JSON the worker reads."""
    body = request.get_json(silent=True)
    if not isinstance(body, dict) or not isinstance(body.get("dicomweb"), dict):
        raise APIError(
            ErrorCode.BAD_REQUEST,
            'send {"dicomweb": {"study_uids": [...]}} or {"dicomweb": {"query": {...}}}',
        )
    spec = body["dicomweb"]
    if ("study_uids" in spec) == ("query" in spec):
        raise _invalid("dicomweb needs exactly one of study_uids and query")
    if "study_uids" in spec:
        return json.dumps({"study_uids": _study_uids(spec["study_uids"])})
    return json.dumps({"query": _query(spec["query"])})
