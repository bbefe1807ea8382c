"""DICOM Part 10 input: header, checks, scope, decoding to 8-bit grayscale, de-identification.

Invariant: nothing is decoded before the header has been read and checked.  :func:`read_header`
stops before the pixel data (it only looks at where the Pixel Data element is and that its value
is all there); :func:`check_dicom` refuses, from that header alone, what no decoding could help
(no pixels, a non-image SOP class, Rows x Columns over the pixel limit, several frames, a
transfer syntax no installed pydicom handler decodes); only then does :func:`decode` decode.
Every refusal is an :class:`~shared.imaging.ImageError` with a code from the one catalogue in
:mod:`shared.imaging`.  Imports pydicom, numpy and those error classes; never TensorFlow.

Decoding (:func:`decode`) follows PS3.3's grayscale pipeline, as a viewer shows the film:

1. the Modality LUT (Rescale Slope/Intercept or a Modality LUT Sequence);
2. the VOI LUT Sequence, else the first Window Center/Width (``apply_voi_lut``'s preference),
   mapped onto [0, 1] over that transform's whole output range;
3. without a usable VOI: 8-bit unsigned values that no modality LUT changed are display values
   already and map 0..255 as a PNG does; anything else gets a robust window from its 0.5th to
   99.5th percentile (12- and 16-bit detectors rarely fill their range);
4. MONOCHROME1 inverted after windowing; RGB, YBR and PALETTE COLOR converted to gray (ITU-R
   BT.601 weights, as OpenCV's ``RGB2GRAY``).  PixelSpacing is ignored.

The patient's age (:func:`age_years`, from PatientAge, else PatientBirthDate and the study's
date) is the one value read from the header that is about the patient rather than the film: the
model is validated on adults only, so :func:`header_scope` skips a film of a patient under
:data:`ADULT_AGE_YEARS`.  Only the derived number of years is kept (in :class:`DicomHeader`, out
of its repr); the raw age and dates are never kept, logged or quoted in a message, and a value
that cannot be read gives no age, never a refusal.  De-identification drops them
(:data:`KEPT_KEYWORDS`), so the age can only be known from the ORIGINAL header, which is why
:mod:`shared.ingest` takes that decision at the door.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import functools
import io
import logging
import re
import struct
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import ParamSpec, TypeVar

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError as PydicomInvalidDicomError
from pydicom.filereader import read_dataset
from pydicom.pixels import (
    apply_color_lut,
    apply_modality_lut,
    apply_voi,
    apply_windowing,
    get_decoder,
)
from pydicom.sequence import Sequence
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, generate_uid

from shared.imaging import (
    CorruptImageError,
    ImageTooLargeError,
    InvalidDicomError,
    MultiFrameError,
    NotAnImageError,
    NotChestError,
    NotChestRadiographError,
    NotFrontalError,
    OutOfScopeError,
    PediatricNotSupportedError,
    TruncatedImageError,
    UnsupportedTransferSyntaxError,
)
from shared.settings import DEFAULT_MAX_PIXELS

P = ParamSpec("P")
R = TypeVar("R")

PREAMBLE = 128
MAGIC = b"DICM"
PIXEL_DATA = 0x7FE00010
# Float and Double Float Pixel Data (parametric maps) stop the header too; they are no film.
PIXEL_TAGS = frozenset({PIXEL_DATA, 0x7FE00008, 0x7FE00009})
UNDEFINED_LENGTH = 0xFFFFFFFF
# Explicit VRs whose length takes 4 bytes after 2 reserved ones (PS3.5 7.1.2).
LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)

#: Modalities that are plain projection radiographs; any other one is out of scope.
RADIOGRAPH_MODALITIES = frozenset({"CR", "DX"})
#: ViewPosition values that are not frontal (PS3.3 C.8.11.5 defined terms and common variants).
NOT_FRONTAL_VIEWS = frozenset(
    {"LL", "RL", "LLD", "RLD", "LATERAL", "LAT", "LLO", "RLO", "OBLIQUE", "DECUBITUS"}
)
#: BodyPartExamined words that mean the chest (matched word by word, ignoring case).
CHEST_WORDS = frozenset({"CHEST", "THORAX", "LUNG", "LUNGS"})
#: The age, in years, from which a patient is an adult: the model is trained and validated on
#: adults only (MODEL_CARD.md), so a film of a younger patient is not scored.
ADULT_AGE_YEARS = 18
#: An age beyond this (or below 0) is no patient's: a malformed value, which gives no age.
MAX_PLAUSIBLE_AGE_YEARS = 150
#: PatientAge is an AS value (PS3.5 6.2): three digits and D(ays), W(eeks), M(onths) or Y(ears);
#: fewer digits ("6Y") are read too: unambiguous, and a child's age must not be missed for them.
AGE_STRING = re.compile(r"(\d{1,3})([DWMY])")
AGE_UNIT_YEARS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}
#: Where the date the film was taken is read from, first present first (DA values).
STUDY_DATE_KEYWORDS = ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate")
#: A DA value (PS3.5 6.2): YYYYMMDD.
DATE_STRING = re.compile(r"(\d{4})(\d{2})(\d{2})")
#: SOP classes that never hold a film, by UID prefix: SR and key objects, waveforms,
#: presentation states, encapsulated documents, RT plans/structures/records, raw data,
#: spectroscopy.  A file without Pixel Data is refused whatever its class says.
NON_IMAGE_SOP_PREFIXES = (
    "1.2.840.10008.5.1.4.1.1.88.",
    "1.2.840.10008.5.1.4.1.1.9.",
    "1.2.840.10008.5.1.4.1.1.11.",
    "1.2.840.10008.5.1.4.1.1.104.",
    "1.2.840.10008.5.1.4.1.1.481.3",
    "1.2.840.10008.5.1.4.1.1.481.4",
    "1.2.840.10008.5.1.4.1.1.481.5",
    "1.2.840.10008.5.1.4.1.1.481.6",
    "1.2.840.10008.5.1.4.1.1.481.7",
    "1.2.840.10008.5.1.4.1.1.481.8",
    "1.2.840.10008.5.1.4.1.1.481.9",
    "1.2.840.10008.5.1.4.1.1.66",
    "1.2.840.10008.5.1.4.1.1.4.2",
    "1.2.840.10008.1.3.10",  # a DICOMDIR
)
# A deflated dataset inflates to at most this many bytes per allowed pixel (3 samples of 16
# bits), plus room for the rest of the header; more is a deflate bomb.
INFLATED_BYTES_PER_PIXEL = 6
INFLATED_HEADROOM = 16 << 20
# pydicom and its plugins raise these for files they cannot parse or decode.
PARSE_ERRORS = (
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    RuntimeError,
    OSError,
    EOFError,
    struct.error,
    zlib.error,
    PydicomInvalidDicomError,
)


#: Libraries whose log lines and warnings may quote identifying values (names, UIDs, URLs:
#: urllib3 logs each request's path at DEBUG).
QUIET_LOGGERS = ("pydicom", "highdicom", "dicomweb_client", "urllib3")


@contextlib.contextmanager
def quiet_dicom_libraries() -> Iterator[None]:
    """No log record (at any level, from the loggers in :data:`QUIET_LOGGERS` and their
    children) and no warning while inside: our own code logs what happened, by type and id."""
    loggers = [logging.getLogger(name) for name in QUIET_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL + 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def quiet(fn: Callable[P, R]) -> Callable[P, R]:
    """``fn`` runs inside :func:`quiet_dicom_libraries`."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with quiet_dicom_libraries():
            return fn(*args, **kwargs)

    return wrapper


@dataclass(frozen=True)
class DicomHeader:
    """What the header says, before any pixel is read.  ``transfer_syntax`` is the file meta's
    UID; ``frames`` is 1 where NumberOfFrames is absent; ``rows``/``columns`` 0 where absent.
    ``has_pixel_data`` is False only where the file is known to hold no Pixel Data element.
    ``age_years`` is derived (:func:`age_years`), None where the header does not tell it; the
    raw age and dates are not kept, and the age stays out of the repr (so out of any log line
    or traceback that prints a header)."""

    study_uid: str | None
    series_uid: str | None
    sop_uid: str | None
    sop_class_uid: str | None
    modality: str | None
    view_position: str | None
    body_part: str | None
    rows: int
    columns: int
    frames: int
    transfer_syntax: str
    photometric: str | None
    has_pixel_data: bool = True
    age_years: float | None = field(default=None, repr=False)


def is_dicom(data: bytes) -> bool:
    """A DICOM Part 10 file: "DICM" after the 128-byte preamble."""
    return data[PREAMBLE : PREAMBLE + len(MAGIC)] == MAGIC


# --------------------------------------------------------------------------- header


def _file_meta(data: bytes) -> tuple[int, str]:
    """(where the dataset starts, the transfer syntax UID) from the file meta group, which is
    explicit VR little endian in every Part 10 file (PS3.10 7.1)."""
    at, syntax = PREAMBLE + len(MAGIC), None
    while at + 8 <= len(data):
        group, element, vr = struct.unpack_from("<HH2s", data, at)
        if group != 0x0002:
            break
        if vr in LONG_VRS:
            if at + 12 > len(data):
                break
            (length,), start = struct.unpack_from("<I", data, at + 8), at + 12
        else:
            (length,), start = struct.unpack_from("<H", data, at + 6), at + 8
        if start + length > len(data):
            raise TruncatedImageError("the DICOM file ends inside its file meta information")
        if element == 0x0010:
            syntax = data[start : start + length].rstrip(b"\0 ").decode("ascii", "replace")
        at = start + length
    if not syntax:
        raise InvalidDicomError("the DICOM file meta information names no transfer syntax")
    return at, syntax


def _encoding(syntax: str) -> tuple[bool, bool]:
    """(implicit VR, little endian); any syntax pydicom does not know is explicit little endian,
    as every encapsulated one is (PS3.5 A.4)."""
    uid = UID(syntax)
    if uid.is_transfer_syntax:
        return uid.is_implicit_VR, uid.is_little_endian
    return False, True


def _inflate(body: bytes, max_pixels: int) -> bytes:
    """A deflated dataset (PS3.5 A.5), inflated no further than ``max_pixels`` can need."""
    limit = max_pixels * INFLATED_BYTES_PER_PIXEL + INFLATED_HEADROOM
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        inflated = inflater.decompress(body, limit)
    except zlib.error as exc:
        raise CorruptImageError("the deflated DICOM dataset cannot be inflated") from exc
    if inflater.unconsumed_tail:
        raise ImageTooLargeError(f"the deflated DICOM dataset inflates beyond {limit:,} bytes")
    if not inflater.eof:
        raise TruncatedImageError("the deflated DICOM dataset ends early")
    return inflated


def _stop_at_pixels(found: list[int]) -> Callable[[int, str | None, int], bool]:
    def stop(tag: int, vr: str | None, length: int) -> bool:
        if tag in PIXEL_TAGS:
            found[:] = [int(tag), length]
            return True
        return False

    return stop


def _fragments_complete(body: bytes, at: int) -> None:
    """Walk encapsulated pixel data's items up to its sequence delimiter (PS3.5 A.4)."""
    while at + 8 <= len(body):
        group, element, length = struct.unpack_from("<HHI", body, at)
        if (group, element) == (0xFFFE, 0xE0DD):
            return
        if (group, element) != (0xFFFE, 0xE000) or length == UNDEFINED_LENGTH:
            raise CorruptImageError("the encapsulated DICOM pixel data is malformed")
        at += 8 + length
    raise TruncatedImageError("the DICOM file ends inside its pixel data")


def _pixel_data_present(body: bytes, at: int, found: list[int]) -> bool:
    """Whether the header stopped at Pixel Data; raises when its value is cut short."""
    if not found:
        return False
    tag, length = found
    if tag != PIXEL_DATA:
        return False
    # Read from the bytes, not the transfer syntax: pydicom reads files that switch to implicit
    # VR after their meta.  Explicit Pixel Data is OB/OW/UN, which have a 4-byte length.
    explicit = body[at + 4 : at + 6] in (b"OB", b"OW", b"UN")
    start = at + (12 if explicit else 8)
    if length == UNDEFINED_LENGTH:
        _fragments_complete(body, start)
    elif start + length > len(body):
        raise TruncatedImageError("the DICOM file ends inside its pixel data")
    return True


def _text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    text = "" if value is None else str(value).strip()
    return text or None


def _age_string_years(value: str) -> float | None:
    match = AGE_STRING.fullmatch(value.upper())
    if match is None:
        return None
    return int(match.group(1)) * AGE_UNIT_YEARS[match.group(2)]


def _date(value: str | None) -> dt.date | None:
    match = DATE_STRING.fullmatch(value or "")
    if match is None:
        return None
    try:
        return dt.date(*(int(part) for part in match.groups()))
    except ValueError:  # 20230230, month 13, ...
        return None


def _anniversary(birth: dt.date, year: int) -> dt.date:
    """The birthday in ``year`` (28 February for one born on 29 February, in a common year)."""
    try:
        return birth.replace(year=year)
    except ValueError:
        return birth.replace(year=year, day=28)


def _years_between(birth: dt.date, on: dt.date) -> float:
    """Calendar years from ``birth`` to ``on``, with the fraction of the year since the last
    birthday: a film taken on the 18th birthday is 18.0, an adult's, not 17.99."""
    years = on.year - birth.year - ((on.month, on.day) < (birth.month, birth.day))
    last, following = (
        _anniversary(birth, birth.year + years),
        _anniversary(birth, birth.year + years + 1),
    )
    return years + (on - last).days / (following - last).days


def age_years(ds: Dataset) -> float | None:
    """The patient's age when the film was taken, in years: PatientAge, else (absent or
    unreadable) PatientBirthDate against the first present of :data:`STUDY_DATE_KEYWORDS`.
    None where neither tells it, or what they say is malformed or implausible (a film before
    the birth, an age over :data:`MAX_PLAUSIBLE_AGE_YEARS`): an unreadable age refuses nothing.
    The raw values never leave this function, so nothing else can keep or log them."""
    try:
        years = _age_string_years(_text(ds, "PatientAge") or "")
        if years is None:
            birth = _date(_text(ds, "PatientBirthDate"))
            taken = next(
                (text for k in STUDY_DATE_KEYWORDS if (text := _text(ds, k)) is not None), None
            )
            on = _date(taken)
            years = _years_between(birth, on) if birth and on and on >= birth else None
    except PARSE_ERRORS:  # a value pydicom cannot convert: no age, and no error either
        return None
    if years is None or not 0 <= years <= MAX_PLAUSIBLE_AGE_YEARS:
        return None
    return years


def _header_of(ds: Dataset, syntax: str, has_pixels: bool) -> DicomHeader:
    return DicomHeader(
        study_uid=_text(ds, "StudyInstanceUID"),
        series_uid=_text(ds, "SeriesInstanceUID"),
        sop_uid=_text(ds, "SOPInstanceUID"),
        sop_class_uid=_text(ds, "SOPClassUID"),
        modality=_text(ds, "Modality"),
        view_position=_text(ds, "ViewPosition"),
        body_part=_text(ds, "BodyPartExamined"),
        rows=int(ds.get("Rows") or 0),
        columns=int(ds.get("Columns") or 0),
        frames=int(ds.get("NumberOfFrames") or 1),
        transfer_syntax=syntax,
        photometric=_text(ds, "PhotometricInterpretation"),
        has_pixel_data=has_pixels,
        age_years=age_years(ds),
    )


@quiet
def read_header(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> DicomHeader:
    """The header of a Part 10 file, read up to (never into) its pixel data.  A file pydicom
    cannot parse raises :class:`InvalidDicomError`; pixel data cut short, Truncated.  A deflated
    dataset is inflated only as far as ``max_pixels`` can need (a deflate bomb is refused)."""
    if not is_dicom(data):
        raise NotAnImageError("not a DICOM Part 10 file (no 'DICM' after the preamble)")
    start, syntax = _file_meta(data)
    implicit, little = _encoding(syntax)
    body = data[start:]
    if syntax == DeflatedExplicitVRLittleEndian:
        body = _inflate(body, max_pixels)
    fp, found = io.BytesIO(body), []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns of every odd value; we check below
            ds = read_dataset(fp, implicit, little, stop_when=_stop_at_pixels(found))
    except PARSE_ERRORS as exc:
        raise InvalidDicomError(f"the DICOM header cannot be parsed: {exc}") from exc
    has_pixels = _pixel_data_present(body, fp.tell(), found)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _header_of(ds, syntax, has_pixels)
    except PARSE_ERRORS as exc:  # values are converted only when read
        raise InvalidDicomError(f"the DICOM header holds invalid values: {exc}") from exc


# --------------------------------------------------------------------------- checks and scope


def decodable(transfer_syntax: str) -> bool:
    """Whether an installed pydicom pixel handler decodes this transfer syntax."""
    try:
        return bool(get_decoder(UID(transfer_syntax)).is_available)
    except (NotImplementedError, ValueError):
        return False


def check_dicom(header: DicomHeader, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """Refuse, from the header alone, a file that is no single decodable film of allowed size."""
    sop_class = header.sop_class_uid or ""
    if not header.has_pixel_data or sop_class.startswith(NON_IMAGE_SOP_PREFIXES):
        raise NotAnImageError(
            f"the DICOM file holds no image (SOP class {sop_class or 'unknown'}, "
            f"{'with' if header.has_pixel_data else 'no'} pixel data)"
        )
    if header.rows <= 0 or header.columns <= 0:
        raise CorruptImageError("the DICOM header declares an empty image")
    pixels = header.rows * header.columns
    if pixels > max_pixels:
        raise ImageTooLargeError(
            f"the image is {header.columns}x{header.rows} = {pixels:,} pixels; "
            f"the limit is {max_pixels:,}"
        )
    if header.frames > 1:
        raise MultiFrameError(f"the DICOM file holds {header.frames} frames; send one film each")
    if not decodable(header.transfer_syntax):
        name = UID(header.transfer_syntax).name
        raise UnsupportedTransferSyntaxError(
            f"no installed decoder reads the transfer syntax {name} ({header.transfer_syntax})"
        )


def _words(value: str) -> set[str]:
    return set("".join(c if c.isalnum() else " " for c in value.upper()).split())


def header_scope(header: DicomHeader) -> OutOfScopeError | None:
    """What the header says against "frontal chest radiograph of an adult", or None where it
    says nothing against it (absent values: the image-based scope check decides).  What the
    film is (modality, view, body part) is asked before whose it is (the age), so a child's CT
    is ``not_chest_radiograph`` here as at the door."""
    if header.modality and header.modality.upper() not in RADIOGRAPH_MODALITIES:
        return NotChestRadiographError(
            f"not a chest radiograph: the DICOM modality is {header.modality}"
        )
    view = (header.view_position or "").upper()
    if view and (view in NOT_FRONTAL_VIEWS or _words(view) & {"LAT", "LATERAL", "OBLIQUE"}):
        return NotFrontalError(f"not a frontal view: the DICOM view position is {view}")
    if header.body_part and not _words(header.body_part) & CHEST_WORDS:
        return NotChestError(f"not a chest film: the DICOM body part is {header.body_part}")
    if header.age_years is not None and header.age_years < ADULT_AGE_YEARS:
        # no age and no date in the message: it is stored, shown and sent to callbacks
        return PediatricNotSupportedError("a pediatric film: the model is validated on adults only")
    return None


# --------------------------------------------------------------------------- decoding


def _dataset(data: bytes) -> Dataset:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pydicom.dcmread(io.BytesIO(data))
    except PARSE_ERRORS as exc:
        raise InvalidDicomError(f"the DICOM file cannot be parsed: {exc}") from exc


def _pixels(ds: Dataset, header: DicomHeader) -> np.ndarray:
    """The stored values of the one frame (RGB where the file holds YBR)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = ds.pixel_array
    except NotImplementedError as exc:
        raise UnsupportedTransferSyntaxError(
            f"the DICOM pixel data cannot be decoded: {exc}"
        ) from exc
    except PARSE_ERRORS as exc:
        raise CorruptImageError(f"the DICOM pixel data cannot be decoded: {exc}") from exc
    if arr.shape[:2] != (header.rows, header.columns):
        raise CorruptImageError(
            f"the DICOM pixel data decodes to {arr.shape}, not {header.rows}x{header.columns}"
        )
    return arr


def _has_window(ds: Dataset) -> bool:
    return all(ds.get(k) not in (None, "") for k in ("WindowCenter", "WindowWidth"))


def _apply_voi(values: np.ndarray, ds: Dataset) -> np.ndarray | None:
    """``apply_voi_lut(prefer_lut=True)`` with the first LUT or window, scaled to [0, 1] over
    the whole range that transform can output; None where the file has none that works."""
    try:
        if ds.get("VOILUTSequence"):
            count, first, _ = ds.VOILUTSequence[0].LUTDescriptor
            out = apply_voi(np.rint(values).astype(np.int64), ds, 0)
            span = apply_voi(np.arange(first, first + (count or (1 << 16))), ds, 0)
        elif _has_window(ds):
            out = apply_windowing(values, ds, 0)
            with np.errstate(over="ignore"):  # the sigmoid's ends, far outside any window
                span = apply_windowing(np.array([-(2.0**40), 2.0**40]), ds, 0)
        else:
            return None
    except (*PARSE_ERRORS, NotImplementedError):
        return None  # a broken VOI: the fallback window still shows the film
    lo, hi = float(np.min(span)), float(np.max(span))
    return (out - lo) / (hi - lo) if hi > lo else None


def _display_ready(ds: Dataset) -> bool:
    """8-bit unsigned values that no modality LUT changes: display values already."""
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    rescaled = float(slope or 1) != 1 or float(intercept or 0) != 0
    return (
        int(ds.get("BitsStored") or 8) <= 8
        and int(ds.get("PixelRepresentation") or 0) == 0
        and not rescaled
        and not ds.get("ModalityLUTSequence")
    )


def _default_window(values: np.ndarray, ds: Dataset) -> np.ndarray:
    if _display_ready(ds):
        return values / float(2 ** int(ds.get("BitsStored") or 8) - 1)
    step = max(1, int(np.sqrt(values.size / 1_000_000)))  # a million values place the window
    lo, hi = np.percentile(values[::step, ::step], [0.5, 99.5])
    if hi <= lo:
        lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros(values.shape, np.float64)
    return (values - lo) / (hi - lo)


def _monochrome(arr: np.ndarray, ds: Dataset, photometric: str) -> np.ndarray:
    try:
        values = apply_modality_lut(arr, ds).astype(np.float64, copy=False)
    except (*PARSE_ERRORS, NotImplementedError) as exc:
        raise CorruptImageError(f"the DICOM modality LUT cannot be applied: {exc}") from exc
    gray = _apply_voi(values, ds)
    if gray is None:
        gray = _default_window(values, ds)
    gray = np.clip(gray, 0.0, 1.0)
    return 1.0 - gray if photometric == "MONOCHROME1" else gray


def _color(arr: np.ndarray, ds: Dataset, photometric: str) -> np.ndarray:
    if photometric == "PALETTE COLOR":
        try:
            arr = apply_color_lut(arr, ds)
        except (*PARSE_ERRORS, NotImplementedError) as exc:
            raise CorruptImageError(f"the DICOM palette cannot be applied: {exc}") from exc
        top = float(np.iinfo(arr.dtype).max)
    else:
        top = float(2 ** int(ds.get("BitsStored") or 8) - 1)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise CorruptImageError(f"the DICOM {photometric} pixel data has shape {arr.shape}")
    rgb = arr.astype(np.float64) / top
    return np.clip(rgb @ np.array([0.299, 0.587, 0.114]), 0.0, 1.0)


@quiet
def decode(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A single-frame DICOM film -> uint8 grayscale (H, W), as a viewer would show it.  The
    header is read and checked first (:func:`check_dicom`), so nothing refused is decoded."""
    header = read_header(data, max_pixels)
    check_dicom(header, max_pixels)
    ds = _dataset(data)
    arr = _pixels(ds, header)
    photometric = (header.photometric or "MONOCHROME2").upper()
    if arr.ndim == 2 and photometric != "PALETTE COLOR":
        gray = _monochrome(arr, ds, photometric)
    else:
        gray = _color(arr, ds, photometric)
    return np.rint(gray * 255.0).astype(np.uint8)


# --------------------------------------------------------------------------- de-identification

#: What a de-identified file keeps: what decoding and the scope check read, nothing else.  The
#: patient's age and dates are not kept although the scope check reads them: the age is decided
#: from the original header at the door (shared/ingest.py), and must not be stored.
KEPT_KEYWORDS = (
    "SOPClassUID",
    "Modality",
    "ViewPosition",
    "BodyPartExamined",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "PlanarConfiguration",
    "NumberOfFrames",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "RedPaletteColorLookupTableDescriptor",
    "GreenPaletteColorLookupTableDescriptor",
    "BluePaletteColorLookupTableDescriptor",
    "RedPaletteColorLookupTableData",
    "GreenPaletteColorLookupTableData",
    "BluePaletteColorLookupTableData",
    "RescaleIntercept",
    "RescaleSlope",
    "RescaleType",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
    "ExtendedOffsetTable",
    "ExtendedOffsetTableLengths",
    "PixelData",
)
#: Inside the LUT sequences, the tables only (LUTExplanation is free text).
KEPT_LUT_KEYWORDS = ("LUTDescriptor", "ModalityLUTType", "LUTData")
DEIDENTIFICATION_METHOD = [
    "cxr-screen whitelist; exceeds PS3.15 Basic Profile",
    "kept: pixel data, modality LUT, VOI LUT, window",
    "kept: SOP class, modality, view position, body part",
    "new study, series and SOP instance UIDs",
    "all else removed: names, IDs, dates, text, private",
]


def _lut_sequence(items: Sequence) -> Sequence:
    kept = Sequence()
    for item in items:
        clean = Dataset()
        for keyword in KEPT_LUT_KEYWORDS:
            if keyword in item:
                clean.add(copy.deepcopy(item[keyword]))
        kept.append(clean)
    return kept


def _whitelisted(source: Dataset) -> Dataset:
    out = Dataset()
    for keyword in KEPT_KEYWORDS:
        if keyword in source:
            out.add(copy.deepcopy(source[keyword]))
    for keyword in ("ModalityLUTSequence", "VOILUTSequence"):
        if source.get(keyword):
            setattr(out, keyword, _lut_sequence(source[keyword].value))
    return out


@quiet
def deidentify(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[bytes, DicomHeader]:
    """A NEW Part 10 file that holds only :data:`KEPT_KEYWORDS` (and the LUT tables), with new
    random Study/Series/SOP Instance UIDs, PatientIdentityRemoved YES and a
    DeidentificationMethod, in the original transfer syntax (the pixel data byte for byte);
    and the ORIGINAL header, whose UIDs the caller keeps to send results back.

    A whitelist removes more than PS3.15's Basic Application Level Confidentiality Profile by
    construction: every attribute not listed goes, whether the profile names it or not (names,
    IDs, dates, accession, institution, physicians, descriptions, private tags, other
    sequences, the preamble and the file meta's application names).  The result is a container
    for the film, not a complete IOD.  Text burnt into the pixels is not removed."""
    header = read_header(data, max_pixels)  # first: refuses a deflate bomb before pydicom
    source = _dataset(data)
    out = _whitelisted(source)
    out.StudyInstanceUID = generate_uid()
    out.SeriesInstanceUID = generate_uid()
    out.SOPInstanceUID = generate_uid()
    out.PatientIdentityRemoved = "YES"
    out.DeidentificationMethod = DEIDENTIFICATION_METHOD
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = header.sop_class_uid or pydicom.uid.SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
    meta.TransferSyntaxUID = header.transfer_syntax
    out.file_meta = meta
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a kept value that breaks its VR's rules stays as is
            pydicom.dcmwrite(buffer, out, enforce_file_format=True)
    except PARSE_ERRORS as exc:
        raise InvalidDicomError(f"the de-identified DICOM file cannot be written: {exc}") from exc
    return buffer.getvalue(), header
