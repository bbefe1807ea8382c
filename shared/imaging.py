"""The one preprocessing path (OpenCV), used by training, evaluation and serving alike.

``preprocess(data)`` turns the bytes of a PNG (8- or 16-bit), JPEG, BMP, TIFF or DICOM Part 10
file, grayscale or color, of any size, into the model's input: grayscale, resized to 224x224 with
``INTER_AREA``, float32 in [0, 1], repeated to 3 channels.  A DICOM file is decoded to 8-bit
grayscale by :func:`shared.dicom.decode` (modality LUT, window, MONOCHROME1 inverted) and then
follows the same path as a PNG.  A :class:`PreprocessConfig` (stored in the model's
metadata) adds the optional steps: a border crop, the lung-field crop and CLAHE.

With ``lung_crop`` the lung segmenter and the scope net beside it (:mod:`shared.lungs`) run on
the decoded film first, and :func:`shared.lungs.decide` says what it is: a frontal film is
cropped to its lung fields with a margin (two fields found: their box; one: it and its mirror
image; none: a fixed default box, never a random one); a child's film is refused with
:class:`PediatricNotSupportedError`; any other image with :class:`OutOfScopeError` (it is not a
frontal chest radiograph, so it is never scored).  The workers record both as ``skipped``, not
``failed``.

The pixel count is read from the file header *before* the full decode, so a small file that
declares a huge image (a decompression bomb) is refused without allocating it.  Every refusal is
a subclass of :class:`ImageError` with a stable ``code``:

==============================  ===============================  ===================================
exception                       code                             raised when
==============================  ===============================  ===================================
ImageError                      ``invalid_image``                (the base class; the worker) the
                                                                 stored file is missing or fails its
                                                                 checksum
EmptyImageError                 ``empty_image``                  zero bytes
NotAnImageError                 ``not_an_image``                 not PNG/JPEG/BMP/TIFF/DICOM by its
                                                                 magic bytes; a DICOM file without
                                                                 pixel data or of a non-image SOP
                                                                 class (SR, RT plan, waveform, ...)
TruncatedImageError             ``truncated_image``              the file ends before the image does
CorruptImageError               ``corrupt_image``                the header or the pixel data cannot
                                                                 be decoded
ImageTooLargeError              ``image_too_large``              width x height above the limit
                                                                 (default 50 MP); a deflated DICOM
                                                                 that inflates beyond what the limit
                                                                 allows
InvalidDicomError               ``invalid_dicom``                a DICOM Part 10 file pydicom cannot
                                                                 parse
MultiFrameError                 ``multi_frame``                  a DICOM file with NumberOfFrames
                                                                 above 1
UnsupportedTransferSyntaxError  ``unsupported_transfer_syntax``  DICOM pixels in a transfer syntax
                                                                 that no installed pydicom handler
                                                                 decodes
StudyMismatchError              ``study_uid_mismatch``           a STOW-RS
                                                                 instance of another study than the
                                                                 request's path names
OutOfScopeError                 ``not_frontal_chest_xray``       not a frontal chest film by the
                                                                 lung rule and the scope net
                                                                 (lateral, CT, photo, ...)
NotChestRadiographError         ``not_chest_radiograph``         DICOM Modality present and not CR
                                                                 or DX (CT, MR, US, ...)
NotFrontalError                 ``not_frontal``                  DICOM ViewPosition lateral,
                                                                 decubitus or oblique
NotChestError                   ``not_chest``                    DICOM BodyPartExamined present and
                                                                 not the chest
PediatricNotSupportedError      ``pediatric_not_supported``      a child's film: DICOM age under 18,
                                                                 or recognised as pediatric by the
                                                                 image check
==============================  ===============================  ===================================

The last five are *out of scope* (status ``skipped``, never scored): :class:`OutOfScopeError` and
its subclasses, whose codes are :data:`OUT_OF_SCOPE_CODES`; every other code is a failure.  A
DICOM file's header is read first (:mod:`shared.dicom`): what it says about modality, view and
body part, then the patient's age, decides before any pixel is decoded; where it says nothing, the
lung segmenter decides.
"""

from __future__ import annotations

import io
import struct
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import cv2
import numpy as np

from shared.lungs import CROP_MARGIN, LungFinding, LungSegmenter, crop
from shared.model_def import INPUT_SIZE
from shared.settings import DEFAULT_MAX_PIXELS

if TYPE_CHECKING:  # shared.dicom imports this module: it is imported where it is used
    from shared.dicom import DicomHeader

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
TIFF_MAGICS = (b"II*\x00", b"MM\x00*")


class ImageError(ValueError):
    """Base of every input the preprocessing refuses; ``code`` is stable and documented."""

    code = "invalid_image"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class EmptyImageError(ImageError):
    code = "empty_image"


class NotAnImageError(ImageError):
    code = "not_an_image"


class TruncatedImageError(ImageError):
    code = "truncated_image"


class CorruptImageError(ImageError):
    code = "corrupt_image"


class ImageTooLargeError(ImageError):
    code = "image_too_large"


class InvalidDicomError(ImageError):
    code = "invalid_dicom"


class MultiFrameError(ImageError):
    code = "multi_frame"


class UnsupportedTransferSyntaxError(ImageError):
    code = "unsupported_transfer_syntax"


class StudyMismatchError(ImageError):
    code = "study_uid_mismatch"


class OutOfScopeError(ImageError):
    """A readable image that is not a frontal chest radiograph: skipped, never scored.  The
    subclasses name what a DICOM header says it is instead; all of them are skipped alike."""

    code = "not_frontal_chest_xray"


class NotChestRadiographError(OutOfScopeError):
    code = "not_chest_radiograph"


class NotFrontalError(OutOfScopeError):
    code = "not_frontal"


class NotChestError(OutOfScopeError):
    code = "not_chest"


class PediatricNotSupportedError(OutOfScopeError):
    """A child's film: the model is trained and validated on adults only (MODEL_CARD.md), so a
    film known (DICOM age) or recognised (the image check) to be pediatric is not scored."""

    code = "pediatric_not_supported"


#: Every code that means "skipped, not failed" (training and evaluation compare codes, not types).
OUT_OF_SCOPE_CODES = frozenset(
    cls.code
    for cls in (
        OutOfScopeError,
        NotChestRadiographError,
        NotFrontalError,
        NotChestError,
        PediatricNotSupportedError,
    )
)


@dataclass(frozen=True)
class PreprocessConfig:
    """Optional steps on top of the paper's preprocessing; recorded in each model's metadata."""

    crop_fraction: float = 0.0  # cut this fraction off every border (burnt-in text, frames)
    clahe: bool = False  # contrast-limited adaptive histogram equalisation after resizing
    lung_crop: bool = False  # crop to the segmenter's lung fields; refuse films without them
    lung_margin: float = CROP_MARGIN  # added around the lung box, as a fraction of its size
    zscore: bool = False  # standardise each input over its own (lung-crop) pixels, after CLAHE

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, object] | None) -> PreprocessConfig:
        data = data or {}
        return cls(
            crop_fraction=float(data.get("crop_fraction", 0.0)),  # type: ignore[arg-type]
            clahe=bool(data.get("clahe", False)),
            lung_crop=bool(data.get("lung_crop", False)),
            lung_margin=float(data.get("lung_margin", CROP_MARGIN)),  # type: ignore[arg-type]
            zscore=bool(data.get("zscore", False)),
        )


PAPER = PreprocessConfig()


def sniff_format(data: bytes) -> str:
    """Name the container format from the magic bytes, or raise."""
    if not data:
        raise EmptyImageError("the file is empty")
    if data.startswith(PNG_MAGIC):
        return "png"
    if data.startswith(JPEG_MAGIC):
        return "jpeg"
    if data.startswith(b"BM"):
        return "bmp"
    if data.startswith(TIFF_MAGICS):
        return "tiff"
    from shared.dicom import is_dicom  # imports pydicom: only for what no cheaper check named

    if is_dicom(data):
        return "dicom"
    raise NotAnImageError("not a PNG, JPEG, BMP, TIFF or DICOM Part 10 image")


def _header_size(data: bytes, fmt: str) -> tuple[int, int]:
    """(width, height) from the header alone; Pillow reads headers lazily, never pixels."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's own bomb warning: we check ourselves
            saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                with Image.open(io.BytesIO(data), formats=[fmt.upper()]) as img:
                    return img.size
            finally:
                Image.MAX_IMAGE_PIXELS = saved
    except (OSError, SyntaxError, ValueError, struct.error, EOFError) as exc:
        cut_short = (fmt == "jpeg" and b"\xff\xda" not in data) or (
            fmt == "png" and b"IDAT" not in data
        )
        if len(data) < 64 or cut_short:
            raise TruncatedImageError(f"the {fmt.upper()} header is incomplete") from exc
        raise CorruptImageError(f"the {fmt.upper()} header cannot be read") from exc


def _check_complete(data: bytes, fmt: str) -> None:
    """Refuse files that stop early; decoders would fill the missing part with grey."""
    if fmt == "png" and data.rfind(b"IEND") == -1:
        raise TruncatedImageError("the PNG file ends before its IEND chunk")
    # The end-of-image marker must follow the last start-of-scan; data appended after it (some
    # phones add a video) is allowed.
    if fmt == "jpeg" and data.rfind(b"\xff\xd9") < data.rfind(b"\xff\xda"):
        raise TruncatedImageError("the JPEG file ends before its end-of-image marker")
    if fmt == "bmp" and len(data) >= 6:
        (declared,) = struct.unpack_from("<I", data, 2)
        if declared > len(data):
            raise TruncatedImageError("the BMP file is shorter than its header says")


def check_header(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[str, int, int]:
    """Validate format, completeness and pixel count without decoding; return (fmt, w, h)."""
    fmt = sniff_format(data)
    if fmt == "dicom":
        return _check_dicom_header(data, max_pixels)
    width, height = _header_size(data, fmt)
    if width <= 0 or height <= 0:
        raise CorruptImageError("the header declares an empty image")
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"the image is {width}x{height} = {width * height:,} pixels; "
            f"the limit is {max_pixels:,}"
        )
    _check_complete(data, fmt)
    return fmt, width, height


def _checked_dicom_header(data: bytes, max_pixels: int) -> DicomHeader:
    """The DICOM header, read and checked (no pixel is decoded)."""
    from shared import dicom

    header = dicom.read_header(data, max_pixels)
    dicom.check_dicom(header, max_pixels)
    return header


def _check_dicom_header(data: bytes, max_pixels: int) -> tuple[str, int, int]:
    header = _checked_dicom_header(data, max_pixels)
    return "dicom", header.columns, header.rows


def dicom_scope(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """Raise what a DICOM file's header says about scope (modality, view, body part, then the
    patient's age), after the header's own checks and before any pixel is decoded; nothing for
    other formats."""
    if sniff_format(data) != "dicom":
        return
    from shared.dicom import header_scope

    refusal = header_scope(_checked_dicom_header(data, max_pixels))
    if refusal is not None:
        raise refusal


def decode_grayscale(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode to a 2-D float32 array in [0, 1] (8-bit / 255, 16-bit / 65535; DICOM through
    :func:`shared.dicom.decode`, which checks its header itself, as 8-bit)."""
    if sniff_format(data) == "dicom":
        from shared import dicom

        return dicom.decode(data, max_pixels).astype(np.float32) / 255.0
    fmt, _, _ = check_header(data, max_pixels)
    buf = np.frombuffer(data, dtype=np.uint8)
    img = cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE | cv2.IMREAD_ANYDEPTH)
    if img is None or img.size == 0:
        raise CorruptImageError(f"the {fmt.upper()} pixel data cannot be decoded")
    if img.ndim == 3:  # some decoders ignore the grayscale flag for exotic layouts
        img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    if img.dtype == np.uint8:
        return img.astype(np.float32) / 255.0
    if img.dtype == np.uint16:
        return img.astype(np.float32) / 65535.0
    img = img.astype(np.float32)
    lo, hi = float(np.nanmin(img)), float(np.nanmax(img))
    if not np.isfinite(lo) or not np.isfinite(hi):
        raise CorruptImageError("the image holds non-finite values")
    return (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)


def to_model_input(gray: np.ndarray, config: PreprocessConfig = PAPER) -> np.ndarray:
    """Grayscale float image in [0, 1] -> (224, 224, 3) float32 in [0, 1]."""
    if config.crop_fraction > 0:
        h, w = gray.shape
        dy, dx = int(h * config.crop_fraction), int(w * config.crop_fraction)
        if h - 2 * dy >= 8 and w - 2 * dx >= 8:
            gray = gray[dy : h - dy, dx : w - dx]
    small = cv2.resize(gray, (INPUT_SIZE, INPUT_SIZE), interpolation=cv2.INTER_AREA)
    if config.clahe:
        as8 = np.clip(small * 255.0 + 0.5, 0, 255).astype(np.uint8)
        clahe = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8))
        small = clahe.apply(as8).astype(np.float32) / 255.0
    if config.zscore:
        # mean 0.5, +-3 standard deviations onto [0, 1]: a scanner's brightness and contrast
        # (and so its hospital) no longer set the input's range
        std = float(small.std())
        small = (small - float(small.mean())) / (6.0 * std) + 0.5 if std > 1e-6 else small * 0 + 0.5
    small = np.clip(small, 0.0, 1.0).astype(np.float32, copy=False)
    return np.repeat(small[:, :, None], 3, axis=2)


def lung_step(
    gray: np.ndarray, config: PreprocessConfig, segmenter: LungSegmenter | None
) -> np.ndarray:
    """The lung-field crop, where the config asks for it; raises OutOfScopeError."""
    if not config.lung_crop:
        return gray
    if segmenter is None:
        raise RuntimeError("this model crops to the lung fields: it needs its segmenter")
    return lung_crop(gray, segmenter.find(gray, config.lung_margin))


def lung_crop(gray: np.ndarray, finding: LungFinding) -> np.ndarray:
    """Crop to what the segmenter found, or refuse the film as out of scope (as pediatric where
    the scope net recognised a child's film)."""
    if finding.box is None and finding.reason == "pediatric":
        raise PediatricNotSupportedError(
            "a child's film, recognised by the image check (child score "
            f"{finding.child_score:.2f}): the model is validated on adults only"
        )
    if finding.box is None:
        raise OutOfScopeError(
            f"not a frontal chest radiograph: {finding.reason.replace('_', ' ')} "
            f"(lung area {finding.area:.2f})"
        )
    return crop(gray, finding.box)


def preprocess(
    data: bytes,
    config: PreprocessConfig = PAPER,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    segmenter: LungSegmenter | None = None,
) -> np.ndarray:
    """Bytes of an image file -> the model's (224, 224, 3) float32 input; raises ImageError.
    A DICOM header that says "not a frontal chest film" refuses the file before it is decoded."""
    (out,) = preprocess_many([data], config, max_pixels, segmenter)
    if isinstance(out, ImageError):
        raise out
    return out


#: ``map`` or a thread pool's ``map``: decoding, OpenCV and the segmenter release the GIL.
Mapper = Callable[[Callable[[bytes], object], Iterable[bytes]], Iterator[object]]


def _decoded(data: bytes, max_pixels: int) -> np.ndarray | ImageError:
    try:
        dicom_scope(data, max_pixels)
        return decode_grayscale(data, max_pixels)
    except ImageError as exc:
        return exc


def preprocess_many(
    datas: Sequence[bytes],
    config: PreprocessConfig = PAPER,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    segmenter: LungSegmenter | None = None,
    mapper: Mapper = map,
) -> list[np.ndarray | ImageError]:
    """:func:`preprocess` for many files, each one's outcome in order (its input or the
    ImageError that refused it), with the lung segmenter run once on all the decoded films:
    the same steps, and the same results to within float rounding (tested)."""
    grays: list[np.ndarray | ImageError] = list(
        mapper(lambda data: _decoded(data, max_pixels), datas)  # type: ignore[arg-type]
    )
    if config.lung_crop:
        if segmenter is None:
            raise RuntimeError("this model crops to the lung fields: it needs its segmenter")
        films = [g for g in grays if not isinstance(g, ImageError)]
        findings = iter(segmenter.find_many(films, config.lung_margin) if films else [])
        pairs = [(g, None if isinstance(g, ImageError) else next(findings)) for g in grays]
    else:
        pairs = [(g, None) for g in grays]

    def finish(pair: tuple[np.ndarray | ImageError, LungFinding | None]) -> object:
        gray, finding = pair
        if isinstance(gray, ImageError):
            return gray
        try:
            return to_model_input(gray if finding is None else lung_crop(gray, finding), config)
        except ImageError as exc:
            return exc

    return list(mapper(finish, pairs))  # type: ignore[arg-type]
