"""The hospital's PACS over DICOMweb: one client per process, WADO-RS metadata, STOW-RS.

Invariant: every failure leaves this module as one of three :class:`PacsError` kinds, decided
here once: :class:`PacsNotFoundError` (404: the PACS does not hold what was asked for),
:class:`PacsRejectedError` (any other 4xx, or the PACS refused an instance it was sent: sending it
again changes nothing) or :class:`PacsUnavailableError` (no connection, a timeout, 408/429/5xx, a
refusal for lack of resources: worth a retry); :class:`PacsBadResponseError` (an answer that is not
DICOM JSON) is a rejection.  Their messages carry status codes only: never a URL (it holds the
source's UIDs), never a value from a dataset.

While a call is in these libraries their own logging is off (:func:`quiet_dicom_libraries`):
dicomweb-client and urllib3 log URLs, pydicom logs and warns quoting invalid values (a patient
name), highdicom logs the evidence's SOP Instance UID.
"""

from __future__ import annotations

import logging

import requests
from dicomweb_client import DICOMwebClient
from pydicom import Dataset

from shared.dicom import quiet_dicom_libraries
from shared.settings import Settings

log = logging.getLogger(__name__)

#: Seconds to open a connection, and to wait for each read of an answer: an unreachable PACS
#: must fail one attempt in seconds, well inside a task's time limit.
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 60.0


class PacsError(Exception):
    """A DICOMweb call failed; ``status`` is the HTTP status when there was one."""

    def __init__(self, reason: str, status: int | None = None) -> None:
        super().__init__(reason if status is None else f"{reason} (HTTP {status})")
        self.status = status


class PacsNotFoundError(PacsError):
    """404: the PACS holds no such study, series or instance."""


class PacsRejectedError(PacsError):
    """The PACS refused the request (4xx other than 404, 408, 429) or an instance sent."""


class PacsBadResponseError(PacsRejectedError):
    """The source's metadata is unusable: an answer that is not the DICOM JSON it should be,
    or UIDs dicomweb-client will not put in a request."""


class PacsUnavailableError(PacsError):
    """No connection, a timeout, 408, 429 or 5xx: transient, worth a retry."""


def pacs_client(settings: Settings) -> DICOMwebClient | None:
    """A client for ``CXR_DICOMWEB_URL`` (basic auth when ``CXR_DICOMWEB_USERNAME`` is set),
    or None when no PACS is configured.  dicomweb-client's own retries stay off: the caller
    retries, with its own backoff."""
    if not settings.dicomweb_url:
        return None
    session = requests.Session()
    if settings.dicomweb_username:
        session.auth = (settings.dicomweb_username, settings.dicomweb_password)
    client = DICOMwebClient(
        settings.dicomweb_url.rstrip("/"),
        session=session,
        timeout=(CONNECT_TIMEOUT, READ_TIMEOUT),
        # the UIDs are the ones the modality wrote and the PACS holds, conformant or not
        permissive_uid=True,
    )
    client.set_http_retry_params(retry=False)  # on by default: 5 tries, sleeping in between
    return client


def _translate(exc: requests.RequestException) -> PacsError:
    response = getattr(exc, "response", None)
    if not isinstance(exc, requests.HTTPError) or response is None:
        return PacsUnavailableError(type(exc).__name__)
    status = response.status_code
    if status == 404:
        return PacsNotFoundError("not found", status)
    if status in (408, 429) or status >= 500:
        return PacsUnavailableError("server error", status)
    return PacsRejectedError("refused", status)


def _no_bulk_data(_tag: str, _vr: str, _uri: str) -> None:
    """Metadata only: pixel data and other bulk data are not fetched."""
    return None


def retrieve_instance_metadata(
    client: DICOMwebClient, study_uid: str, series_uid: str, sop_uid: str
) -> Dataset:
    """WADO-RS ``.../instances/{sop}/metadata`` as a pydicom Dataset (bulk data left empty)."""
    try:
        with quiet_dicom_libraries():
            found = client.retrieve_instance_metadata(study_uid, series_uid, sop_uid)
    except IndexError:  # a 200 or 204 with an empty array: nothing there
        raise PacsNotFoundError("empty answer") from None
    except requests.RequestException as exc:
        raise _translate(exc) from None
    except ValueError as exc:  # dicomweb-client refused to ask (e.g. a malformed UID)
        raise PacsBadResponseError(f"request not made ({type(exc).__name__})") from None
    if not isinstance(found, dict):
        raise PacsBadResponseError("metadata is not a DICOM JSON object")
    try:
        with quiet_dicom_libraries():
            return Dataset.from_json(found, bulk_data_uri_handler=_no_bulk_data)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise PacsBadResponseError(f"metadata not readable ({type(exc).__name__})") from None


#: STOW-RS failure reasons (PS3.18 §10.5.3) that are the PACS's momentary state, not the data.
_OUT_OF_RESOURCES = range(0xA700, 0xA800)


def store_instances(client: DICOMwebClient, datasets: list[Dataset]) -> Dataset:
    """STOW-RS the datasets; returns the PACS's answer.  Raises unless each one was stored (a
    FailedSOPSequence naming one of them is a rejection, or unavailability when the PACS says
    it is out of resources)."""
    try:
        with quiet_dicom_libraries():
            answer = client.store_instances(datasets)
    except requests.RequestException as exc:
        raise _translate(exc) from None
    except (ValueError, KeyError) as exc:  # a 2xx whose body cannot be read: sent; may be kept
        raise PacsUnavailableError(f"unreadable answer ({type(exc).__name__})") from None
    ours = {str(ds.SOPInstanceUID) for ds in datasets}
    for item in answer.get("FailedSOPSequence", None) or []:
        if str(item.get("ReferencedSOPInstanceUID", "")) not in ours:
            continue
        reason = item.get("FailureReason")
        if reason is not None and int(reason) in _OUT_OF_RESOURCES:
            raise PacsUnavailableError(f"out of resources (failure reason {int(reason):#06x})")
        code = "unknown" if reason is None else f"{int(reason):#06x}"
        raise PacsRejectedError(f"instance refused (failure reason {code})")
    return answer


def search(client: DICOMwebClient, level: str, **kwargs: object) -> list[dict]:
    """QIDO-RS at ``level`` (``studies``, ``series`` or ``instances``), every page of it."""
    method = getattr(client, f"search_for_{level}")
    try:
        with quiet_dicom_libraries():
            return list(method(get_remaining=True, **kwargs))
    except requests.RequestException as exc:
        raise _translate(exc) from None
    except ValueError as exc:  # a malformed UID or filter: the request was never made
        raise PacsBadResponseError(f"request not made ({type(exc).__name__})") from None


def retrieve_part10(client: DICOMwebClient, study_uid: str, series_uid: str, sop_uid: str) -> bytes:
    """WADO-RS one instance as a Part 10 file, in the transfer syntax the PACS holds it in."""
    from pydicom.filebase import DicomBytesIO

    try:
        with quiet_dicom_libraries():
            dataset = client.retrieve_instance(
                study_uid, series_uid, sop_uid, media_types=(("application/dicom", "*"),)
            )
            buffer = DicomBytesIO()
            dataset.save_as(buffer, enforce_file_format=True)
    except requests.RequestException as exc:
        raise _translate(exc) from None
    except (ValueError, TypeError, AttributeError) as exc:
        raise PacsBadResponseError(f"instance not readable ({type(exc).__name__})") from None
    return buffer.getvalue()
