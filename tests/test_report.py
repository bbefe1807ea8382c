"""The SR sent back to the PACS (worker/report.py), built from a source instance's metadata as
WADO-RS gives it: a real Part 10 file, read back, turned into DICOM JSON and parsed again."""

from __future__ import annotations

import io
import logging
import warnings

import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from worker.report import (
    DISCLAIMER,
    NOT_SUSPECTED,
    PRIVATE_SCHEME,
    SERIES_DESCRIPTION,
    SUSPECTED,
    ReportError,
    build_report,
)

DX = "1.2.840.10008.5.1.4.1.1.1.1"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"


def source_file(**overrides: object) -> bytes:
    """A DX chest film as a modality writes it: patient, study and series attributes."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = DX
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "Müller^Anna"
    ds.PatientID = "MRN-0042"
    ds.PatientBirthDate = "19580312"
    ds.PatientSex = "F"
    ds.StudyID = "ST-7"
    ds.StudyDate = "20261120"
    ds.StudyTime = "101500"
    ds.AccessionNumber = "ACC-991"
    ds.ReferringPhysicianName = "House^Gregory"
    ds.StudyDescription = "XR CHEST PA"
    ds.Modality = "DX"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.BodyPartExamined = "CHEST"
    ds.Rows = ds.Columns = 16
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.arange(256, dtype=np.uint16).tobytes()
    for keyword, value in overrides.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def as_wado_metadata(part10: bytes) -> Dataset:
    """What a PACS answers to WADO-RS ``.../metadata``: DICOM JSON, pixel data as a
    BulkDataURI, parsed back with pydicom."""
    ds = pydicom.dcmread(io.BytesIO(part10))
    metadata = ds.to_json_dict(
        bulk_data_threshold=256,
        bulk_data_element_handler=lambda _el: "http://pacs.example/bulk/7fe00010",
    )
    assert "BulkDataURI" in metadata["7FE00010"]
    return Dataset.from_json(metadata, bulk_data_uri_handler=lambda *_: None)


@pytest.fixture
def source() -> Dataset:
    return as_wado_metadata(source_file())


def items(container: Dataset) -> list[Dataset]:
    return list(container.get("ContentSequence", []))


def concept(item: Dataset) -> tuple[str, str]:
    code = item.ConceptNameCodeSequence[0]
    return code.CodingSchemeDesignator, code.CodeValue


def find(container: Dataset, scheme: str, value: str) -> Dataset:
    found = [i for i in items(container) if concept(i) == (scheme, value)]
    assert len(found) == 1, f"{scheme} {value}: {len(found)} items"
    return found[0]


def num(item: Dataset) -> tuple[float, str]:
    assert item.ValueType == "NUM"
    measured = item.MeasuredValueSequence[0]
    return float(measured.NumericValue), measured.MeasurementUnitsCodeSequence[0].CodeValue


def roundtrip(report: Dataset) -> Dataset:
    """The report as the PACS receives it: a Part 10 file."""
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, report, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buffer.getvalue()))


def test_the_report_is_in_the_source_study_in_a_series_of_its_own(source) -> None:
    sr = roundtrip(build_report(source, 0.83, "covid", 0.42, "cxr-cnn-2026.11"))
    assert sr.SOPClassUID == COMPREHENSIVE_SR
    assert sr.Modality == "SR"
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID
    assert sr.SOPInstanceUID != source.SOPInstanceUID
    assert sr.SeriesDescription == SERIES_DESCRIPTION
    # patient and study copied from the source
    assert sr.PatientID == "MRN-0042"
    assert str(sr.PatientName) == "Müller^Anna"
    assert (sr.PatientBirthDate, sr.PatientSex) == ("19580312", "F")
    assert (sr.AccessionNumber, sr.StudyID, sr.StudyDate) == ("ACC-991", "ST-7", "20261120")
    assert sr.StudyDescription == "XR CHEST PA"
    # nobody read it
    assert (sr.PreliminaryFlag, sr.VerificationFlag, sr.CompletionFlag) == (
        "PRELIMINARY",
        "UNVERIFIED",
        "COMPLETE",
    )
    # the source is the evidence
    (evidence,) = sr.CurrentRequestedProcedureEvidenceSequence
    assert evidence.StudyInstanceUID == source.StudyInstanceUID
    (series,) = evidence.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == source.SeriesInstanceUID
    (instance,) = series.ReferencedSOPSequence
    assert instance.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert instance.ReferencedSOPClassUID == DX
    assert [s.CodingSchemeDesignator for s in sr.CodingSchemeIdentificationSequence] == [
        PRIVATE_SCHEME
    ]


def test_the_report_states_finding_probability_threshold_model_and_disclaimer(source) -> None:
    sr = roundtrip(build_report(source, 0.83, "covid", 0.42, "cxr-cnn-2026.11"))
    assert sr.ValueType == "CONTAINER"
    assert concept(sr) == ("LN", "18748-4")
    finding = find(sr, "DCM", "121071")
    assert finding.ValueType == "CODE"
    code = finding.ConceptCodeSequence[0]
    assert (code.CodingSchemeDesignator, code.CodeValue, code.CodeMeaning) == (
        PRIVATE_SCHEME,
        SUSPECTED.value,
        "COVID-19 suspected",
    )
    assert num(find(finding, "DCM", "122157")) == (pytest.approx(0.83), "{ratio}")
    assert num(find(finding, "DCM", "122411")) == (pytest.approx(0.42), "{ratio}")
    image = find(finding, "DCM", "121112")
    assert image.ValueType == "IMAGE"
    assert image.RelationshipType == "INFERRED FROM"
    assert image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert find(sr, "DCM", "111001").TextValue == "cxr-screen"
    assert find(sr, "DCM", "111003").TextValue == "cxr-cnn-2026.11"
    assert find(sr, "DCM", "121106").TextValue == DISCLAIMER == "screening aid, not a diagnosis"


def test_a_negative_result_reports_covid_not_suspected(source) -> None:
    sr = build_report(source, 0.07, "non-covid", 0.42, "v1")
    code = find(sr, "DCM", "121071").ConceptCodeSequence[0]
    assert (code.CodeValue, code.CodeMeaning) == (NOT_SUSPECTED.value, "COVID-19 not suspected")


def test_without_a_threshold_the_report_leaves_it_out(source) -> None:
    finding = find(build_report(source, 0.5, "covid", None, "v1"), "DCM", "121071")
    assert [concept(i) for i in items(finding)] == [("DCM", "122157"), ("DCM", "121112")]


def test_given_uids_are_used(source) -> None:
    sr = build_report(
        source, 0.5, "covid", 0.5, "v1", series_instance_uid="2.25.1", sop_instance_uid="2.25.2"
    )
    assert (sr.SeriesInstanceUID, sr.SOPInstanceUID) == ("2.25.1", "2.25.2")
    assert sr.file_meta.MediaStorageSOPInstanceUID == "2.25.2"


@pytest.mark.filterwarnings("ignore::UserWarning")  # the odd source, as made
def test_metadata_without_the_optional_attributes_still_makes_a_report() -> None:
    """A PACS leaves out attributes that are empty or absent in the file; odd values that
    highdicom refuses are emptied instead of failing the report."""
    source = as_wado_metadata(
        source_file(
            PatientBirthDate=None,
            AccessionNumber=None,
            ReferringPhysicianName=None,
            StudyID=None,
            StudyTime=None,
            PatientSex="U",  # not a DICOM value: M, F or O
            StudyDate="2026-11-20",  # not DA
        )
    )
    sr = roundtrip(build_report(source, 0.6, "covid", 0.5, "v1"))
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert sr.PatientID == "MRN-0042"
    for keyword in ("PatientBirthDate", "AccessionNumber", "StudyID", "StudyTime", "PatientSex"):
        assert keyword in sr
        assert sr[keyword].value in (None, ""), keyword
    assert sr.StudyDate in (None, "")


@pytest.mark.parametrize("keyword", ["StudyInstanceUID", "SOPInstanceUID", "SOPClassUID"])
def test_metadata_without_a_uid_is_refused(source, keyword: str) -> None:
    delattr(source, keyword)
    with pytest.raises(ReportError, match=keyword):
        build_report(source, 0.5, "covid", 0.5, "v1")


def test_an_unknown_label_is_refused(source) -> None:
    with pytest.raises(ReportError):
        build_report(source, 0.5, "maybe", 0.5, "v1")


@pytest.mark.filterwarnings("ignore::UserWarning")  # the odd source, as made
def test_building_a_report_logs_and_warns_no_patient_data(caplog) -> None:
    """highdicom logs the evidence's SOP Instance UID and quotes a patient name it finds odd,
    pydicom warns quoting values: none of it may reach our logs, at any level."""
    source = as_wado_metadata(
        source_file(PatientName="Bad=Name=Too=Many=Groups^X", StudyDate="2026-11-20")
    )
    caplog.set_level(logging.DEBUG)
    caplog.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_report(source, 0.5, "covid", 0.5, "v1")
    assert not caught, [str(w.message)[:80] for w in caught]
    for secret in ("Bad=Name", "MRN-0042", str(source.SOPInstanceUID), "ACC-991", "2026-11-20"):
        assert secret not in caplog.text
