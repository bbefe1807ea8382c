"""The report sent back to the PACS: a DICOM Comprehensive SR on one scored image.

Invariant: the report's patient and study attributes come only from ``source``, the source
instance's metadata as the PACS gives it at send time (WADO-RS), and go nowhere else: this
module keeps none of them, logs none of them, and silences the libraries that would (highdicom
logs the source's SOP Instance UID and quotes a malformed patient name; pydicom warns quoting
values).  The report lives in the source's study, in a series of its own, and references the
source instance as its evidence.

Content (a ``CONTAINER`` titled LOINC 18748-4 "Diagnostic Imaging Report")::

    CONTAINS  CODE  (DCM 121071 "Finding") = (99CXR COVID-SUSP | COVID-NOT-SUSP)
      INFERRED FROM  NUM   (DCM 122157 "Probability") = p            [UCUM {ratio}]
      INFERRED FROM  NUM   (DCM 122411 "Threshold Value") = t        [UCUM {ratio}]
      INFERRED FROM  IMAGE (DCM 121112 "Source of Measurement") -> the source instance
    CONTAINS  TEXT  (DCM 111001 "Algorithm Name") = "cxr-screen"
    CONTAINS  TEXT  (DCM 111003 "Algorithm Version") = the model version
    CONTAINS  TEXT  (DCM 121106 "Comment") = "screening aid, not a diagnosis"

The two finding values are our own codes, in the private coding scheme ``99CXR`` (declared in
the CodingSchemeIdentificationSequence): no standard code says "suspected / not suspected by a
screening model".  Every other concept is a standard DCM, LOINC or UCUM code.  The document is
flagged PRELIMINARY and UNVERIFIED: nobody has read it.
"""

from __future__ import annotations

import copy
import io

import pydicom
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import (
    CodeContentItem,
    CodedConcept,
    ComprehensiveSR,
    ContainerContentItem,
    ContentSequence,
    ImageContentItem,
    NumContentItem,
    RelationshipTypeValues,
    TextContentItem,
)
from pydicom import Dataset
from pydicom.uid import generate_uid
from pydicom.valuerep import DA, TM

from shared.dicomweb import quiet_dicom_libraries

PRIVATE_SCHEME = "99CXR"
ALGORITHM_NAME = "cxr-screen"
SERIES_DESCRIPTION = "cxr-screen COVID-19 screening"
DISCLAIMER = "screening aid, not a diagnosis"
MANUFACTURER = "cxr-screen"
#: The report's series number: high, so that viewers list it after the acquired series.
SERIES_NUMBER = 9901

DOCUMENT_TITLE = CodedConcept("18748-4", "LN", "Diagnostic Imaging Report")
FINDING = CodedConcept("121071", "DCM", "Finding")
PROBABILITY = CodedConcept("122157", "DCM", "Probability")
THRESHOLD = CodedConcept("122411", "DCM", "Threshold Value")
SOURCE_IMAGE = CodedConcept("121112", "DCM", "Source of Measurement")
ALGORITHM_NAME_CONCEPT = CodedConcept("111001", "DCM", "Algorithm Name")
ALGORITHM_VERSION = CodedConcept("111003", "DCM", "Algorithm Version")
COMMENT = CodedConcept("121106", "DCM", "Comment")
RATIO = CodedConcept("{ratio}", "UCUM", "ratio")
#: Code values of at most 16 characters: they fit Code Value (SH), which every reader knows.
SUSPECTED = CodedConcept("COVID-SUSP", PRIVATE_SCHEME, "COVID-19 suspected")
NOT_SUSPECTED = CodedConcept("COVID-NOT-SUSP", PRIVATE_SCHEME, "COVID-19 not suspected")
#: Result labels (:meth:`shared.model_store.ModelInfo.label`) and the finding each reports.
FINDINGS = {"covid": SUSPECTED, "non-covid": NOT_SUSPECTED}

#: What highdicom reads from the evidence by attribute (a metadata response may lack any of
#: them: DICOM makes them type 2, and a PACS leaves out an empty attribute).
_TYPE2 = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)
_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")


class ReportError(ValueError):
    """The source metadata cannot make a report (a UID missing, a SOP class unknown, a label
    with no finding).  The message names attributes, never their values."""


def _valid(value: object, kind: type) -> bool:
    try:
        kind(value)
    except (TypeError, ValueError, OverflowError):
        return False
    return True


def _evidence(source: Dataset) -> Dataset:
    """A copy of ``source`` that highdicom accepts: absent type 2 attributes present and empty,
    values highdicom would refuse (a sex other than M/F/O, a malformed date or time) emptied."""
    for keyword in _UIDS:
        if not source.get(keyword):
            raise ReportError(f"the source metadata has no {keyword}")
    evidence = copy.deepcopy(source)
    for keyword in _TYPE2:
        if keyword not in evidence:
            setattr(evidence, keyword, None)
    if evidence.PatientSex not in (None, "", "M", "F", "O"):
        evidence.PatientSex = None
    for keyword, kind in (("PatientBirthDate", DA), ("StudyDate", DA), ("StudyTime", TM)):
        value = evidence[keyword].value
        if value not in (None, "") and not _valid(value, kind):
            evidence[keyword].value = None
    return evidence


def _content(
    source: Dataset, probability: float, label: str, threshold: float | None, model_version: str
) -> ContainerContentItem:
    if label not in FINDINGS:
        raise ReportError("the result's label has no finding")
    inferred = RelationshipTypeValues.INFERRED_FROM
    contains = RelationshipTypeValues.CONTAINS
    evidence = [NumContentItem(PROBABILITY, float(probability), RATIO, relationship_type=inferred)]
    if threshold is not None:
        evidence.append(
            NumContentItem(THRESHOLD, float(threshold), RATIO, relationship_type=inferred)
        )
    evidence.append(
        ImageContentItem(
            SOURCE_IMAGE,
            referenced_sop_class_uid=source.SOPClassUID,
            referenced_sop_instance_uid=source.SOPInstanceUID,
            relationship_type=inferred,
        )
    )
    finding = CodeContentItem(FINDING, FINDINGS[label], contains)
    finding.ContentSequence = ContentSequence(evidence)
    root = ContainerContentItem(DOCUMENT_TITLE, is_content_continuous=False)
    root.ContentSequence = ContentSequence(
        [
            finding,
            TextContentItem(ALGORITHM_NAME_CONCEPT, ALGORITHM_NAME, contains),
            TextContentItem(ALGORITHM_VERSION, model_version, contains),
            TextContentItem(COMMENT, DISCLAIMER, contains),
        ]
    )
    return root


def build_report(
    source: Dataset,
    probability: float,
    label: str,
    threshold: float | None,
    model_version: str,
    *,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
) -> Dataset:
    """A Comprehensive SR on the scored ``source`` instance (its metadata: no pixel data needed).

    ``threshold`` may be None (the model that scored the image is no longer at hand): the
    report then omits it.  The series and SOP instance UIDs are new ones unless given (the
    delivery derives them from the image's id, so that a report sent twice is one instance).
    """
    with quiet_dicom_libraries():
        evidence = _evidence(source)
        content = _content(evidence, probability, label, threshold, model_version)
        try:
            report = ComprehensiveSR(
                evidence=[evidence],
                content=content,
                series_instance_uid=series_instance_uid or generate_uid(),
                series_number=SERIES_NUMBER,
                sop_instance_uid=sop_instance_uid or generate_uid(),
                instance_number=1,
                manufacturer=MANUFACTURER,
                is_complete=True,
                is_final=False,
                is_verified=False,
                series_description=SERIES_DESCRIPTION,
                specific_character_set="ISO_IR 192",  # DICOM JSON values are Unicode
                coding_schemes=[
                    CodingSchemeIdentificationItem(PRIVATE_SCHEME, name="cxr-screen findings")
                ],
            )
            with io.BytesIO() as buffer:  # what cannot be written cannot be sent: fail here
                pydicom.dcmwrite(buffer, report, enforce_file_format=True)
        except (KeyError, ValueError, TypeError, AttributeError, OverflowError) as exc:
            # e.g. a SOP class highdicom does not know; the message may quote values: dropped
            raise ReportError(f"no report from this source ({type(exc).__name__})") from None
    return report
