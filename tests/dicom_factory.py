"""Generated DICOM Part 10 files for the tests (the one place that writes them).

Every file is written with pydicom from a generated film (:func:`ml.synthetic.chest_film`) or from
pixels a test gives; :func:`pacs_dataset` adds what a PACS files an instance under (patient,
study, series and instance attributes), for the tests against Orthanc.  The variants that change
the stored values (MONOCHROME1 12-bit, signed 16-bit with a rescale) carry a window that maps
them back onto the 8-bit film exactly, so a test can ask for the *same* pixels after decoding;
:func:`raw_window` gives the window that covers a range.
"""

from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    generate_uid,
)

from ml.synthetic import chest_film

MARKER = "MARKER-7Q"


def film(seed: int = 0, height: int = 300, width: int = 256) -> np.ndarray:
    """The generated frontal film (uint8), as every variant below starts from it."""
    return chest_film(seed, height=height, width=width)


def raw_window(lo: float, hi: float) -> tuple[float, float]:
    """(centre, width) of the LINEAR window (PS3.3 C.11.2.1.2) that maps ``lo`` to black and
    ``hi`` to white, exactly and linearly in between."""
    return (lo + hi) / 2 + 0.5, hi - lo + 1


def dataset(
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    syntax: str = ExplicitVRLittleEndian,
    **attributes: Any,
) -> Dataset:
    """A DX film dataset holding ``pixels`` (uint8, uint16 or int16; (H, W) or (H, W, 3)) natively
    in ``syntax``'s byte order.  ``attributes`` are DICOM keywords set as given (None removes)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "DX"
    ds.ViewPosition = "PA"
    ds.BodyPartExamined = "CHEST"
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel = 3 if pixels.ndim == 3 else 1
    if pixels.ndim == 3:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if np.issubdtype(pixels.dtype, np.signedinteger) else 0
    ds.PixelData = pixels.tobytes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # some tests need values that break CS rules ("chest")
        for keyword, value in attributes.items():
            if value is None:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def to_bytes(ds: Dataset) -> bytes:
    """The dataset as a Part 10 file."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the marker is no valid date, and says so
        pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def dicom_bytes(pixels: np.ndarray, **kwargs: Any) -> bytes:
    return to_bytes(dataset(pixels, **kwargs))


# --------------------------------------------------------------------------- as a PACS holds them


def pacs_attributes(*, patient_id: str = "ORTHANC-TEST", **attributes: Any) -> dict[str, Any]:
    """The patient, study, series and instance attributes a PACS files an instance under (and
    that a report sent back into the study repeats), as keywords for :func:`dataset` and the
    variants below; ``attributes`` are added or override."""
    return {
        "PatientID": patient_id,
        "PatientName": "Test^Orthanc",
        "PatientBirthDate": "",
        "PatientSex": "O",
        "StudyDate": "20240101",
        "StudyTime": "120000",
        "StudyID": "1",
        "AccessionNumber": "ACC0001",
        "ReferringPhysicianName": "",
        "SeriesNumber": 1,
        "InstanceNumber": 1,
        **attributes,
    }


def pacs_dataset(
    pixels: np.ndarray | None = None,
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    modality: str = "DX",
    patient_id: str = "ORTHANC-TEST",
    size: int = 64,
    seed: int = 0,
    **attributes: Any,
) -> Dataset:
    """A DX (For Presentation) or CR film with :func:`pacs_attributes`: ``pixels``, or else the
    ``size`` x ``size`` :func:`film` of ``seed``; new UIDs where none is given.  It carries a
    preamble, so that even a plain ``dcmwrite`` (dicomweb-client's ``store_instances``) writes
    a Part 10 file: without one pydicom leaves out preamble and "DICM", Orthanc stores that as
    it is, and WADO-RS then serves a file that ``pydicom.dcmread`` refuses."""
    if modality == "DX":
        kind = {"PresentationIntentType": "FOR PRESENTATION", "ImageType": ["ORIGINAL", "PRIMARY"]}
    elif modality == "CR":
        kind = {"SOPClassUID": ComputedRadiographyImageStorage, "Modality": "CR"}
    else:
        raise ValueError(f"modality must be DX or CR, not {modality!r}")
    uids = {
        keyword: uid
        for keyword, uid in (
            ("StudyInstanceUID", study_uid),
            ("SeriesInstanceUID", series_uid),
            ("SOPInstanceUID", sop_uid),
        )
        if uid
    }
    if pixels is None:
        pixels = film(seed, height=size, width=size)
    ds = dataset(pixels, **{**pacs_attributes(patient_id=patient_id), **kind, **uids, **attributes})
    ds.preamble = b"\0" * 128
    return ds


def compressed(ds: Dataset, syntax: str) -> bytes:
    """``ds`` compressed by pydicom's own encoders (lossless syntaxes in these tests)."""
    ds.compress(syntax, generate_instance_uid=False)
    return to_bytes(ds)


def encapsulated(syntax: str, pixels: np.ndarray) -> bytes:
    """A film whose pixel data is one encapsulated fragment of raw bytes, labelled ``syntax``."""
    ds = dataset(pixels, syntax=syntax)
    ds.PixelData = encapsulate([pixels.tobytes()])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return to_bytes(ds)


# --------------------------------------------------------------------------- variants of one film
# Each decodes (modality LUT, window, MONOCHROME1 inversion) to exactly the uint8 film it holds.


def mono8(img: np.ndarray, **kwargs: Any) -> bytes:
    return dicom_bytes(img, **kwargs)


def mono1_12bit(img: np.ndarray, **kwargs: Any) -> bytes:
    """MONOCHROME1 (white is 0), 12 bits stored in 16: stored = (255 - film) * 16."""
    stored = ((255 - img.astype(np.uint16)) * 16).astype(np.uint16)
    centre, width = raw_window(0, 255 * 16)
    return dicom_bytes(
        stored,
        photometric="MONOCHROME1",
        bits_stored=12,
        WindowCenter=centre,
        WindowWidth=width,
        **kwargs,
    )


SIGNED_SCALE, SIGNED_OFFSET = 100, -20000
SLOPE, INTERCEPT = 0.5, 10000.0


def signed16_dataset(img: np.ndarray, window: bool = True, **kwargs: Any) -> Dataset:
    """Signed 16-bit: stored = film * 100 - 20000 (negative for most of the film), rescaled
    by 0.5 and +10000 to film * 50; the window covers 0..255 * 50."""
    stored = (img.astype(np.int32) * SIGNED_SCALE + SIGNED_OFFSET).astype(np.int16)
    if window:
        lo = (0 * SIGNED_SCALE + SIGNED_OFFSET) * SLOPE + INTERCEPT
        hi = (255 * SIGNED_SCALE + SIGNED_OFFSET) * SLOPE + INTERCEPT
        kwargs["WindowCenter"], kwargs["WindowWidth"] = raw_window(lo, hi)
    return dataset(
        stored, RescaleSlope=SLOPE, RescaleIntercept=INTERCEPT, RescaleType="US", **kwargs
    )


def signed16(img: np.ndarray, **kwargs: Any) -> bytes:
    return to_bytes(signed16_dataset(img, **kwargs))


def voi_lut_dataset(img: np.ndarray) -> Dataset:
    """12-bit stored = film * 16, with a VOI LUT Sequence that *inverts* it into 16-bit output
    (so the LUT, and not a window or the fallback, is seen to apply), and a window that would
    not invert: the LUT must win."""
    stored = (img.astype(np.uint16) * 16).astype(np.uint16)
    entries = np.arange(4096)
    table = ((4095 - entries) // 16 * 257).astype("<u2")
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.LUTExplanation = "inverting test LUT"
    item.add_new("LUTData", "OW", table.tobytes())
    centre, width = raw_window(0, 4095)
    return dataset(
        stored, bits_stored=12, VOILUTSequence=[item], WindowCenter=centre, WindowWidth=width
    )


# --------------------------------------------------------------------------- files that are refused


def structured_report() -> bytes:
    """An SR document: a Part 10 file with no pixel data."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = pydicom.uid.BasicTextSRStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.Modality = "SR"
    ds.ValueType = "CONTAINER"
    return to_bytes(ds)


def declaring(rows: int, columns: int, **attributes: Any) -> bytes:
    """A header that declares ``rows`` x ``columns`` over 4 bytes of pixel data: any decode
    would fail on the missing bytes, so only a refusal from the header names the size."""
    ds = dataset(np.zeros((2, 2), np.uint8), **attributes)
    ds.Rows, ds.Columns = rows, columns
    return to_bytes(ds)


def with_identity_everywhere(img: np.ndarray, **kwargs: Any) -> Dataset:
    """A film whose every identifying place holds :data:`MARKER`: patient, study, institution and
    staff attributes, free text, a private tag, nested sequences, the file meta's application
    names and the preamble."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the marker is no valid date, age or time
        return _identify(dataset(img, **kwargs))


def _identify(ds: Dataset) -> Dataset:
    ds.preamble = MARKER.encode().ljust(128, b"\0")
    ds.file_meta.ImplementationVersionName = MARKER
    ds.file_meta.SourceApplicationEntityTitle = MARKER
    for keyword in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "PatientAge",
        "OtherPatientIDs",
        "AccessionNumber",
        "InstitutionName",
        "InstitutionAddress",
        "ReferringPhysicianName",
        "PerformingPhysicianName",
        "OperatorsName",
        "StationName",
        "DeviceSerialNumber",
        "StudyDate",
        "StudyTime",
        "SeriesDate",
        "AcquisitionDateTime",
        "StudyDescription",
        "SeriesDescription",
        "StudyID",
        "ImageComments",
        "WindowCenterWidthExplanation",
    ):
        setattr(ds, keyword, MARKER)
    person = Dataset()
    person.PatientID = MARKER
    person.IssuerOfPatientID = MARKER
    ds.OtherPatientIDsSequence = [person]
    request = Dataset()
    request.RequestedProcedureDescription = MARKER
    ds.RequestAttributesSequence = [request]
    ds.private_block(0x0009, MARKER, create=True).add_new(0x10, "LO", MARKER)
    return ds
