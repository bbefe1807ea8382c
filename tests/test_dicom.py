"""DICOM Part 10 input: header checks before decoding, the grayscale pipeline, header scope,
de-identification, the client's folder walk, and DICOM against PNG through the one path."""

from __future__ import annotations

import ast
import csv
import io
import zlib
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.pixels import get_encoder
from pydicom.uid import (
    MPEG2MPML,
    UID,
    DeflatedExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from cli.client import collect_paths
from shared import dicom, imaging
from shared.imaging import (
    OUT_OF_SCOPE_CODES,
    CorruptImageError,
    ImageError,
    ImageTooLargeError,
    InvalidDicomError,
    MultiFrameError,
    NotAnImageError,
    OutOfScopeError,
    PreprocessConfig,
    TruncatedImageError,
    UnsupportedTransferSyntaxError,
    check_header,
    decode_grayscale,
    preprocess,
    sniff_format,
)
from tests import dicom_factory as make
from tests.factories import encode

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO.parent / "shared" / "data" / "dicom-samples"
JPEG2000_PART2 = UID("1.2.840.10008.1.2.4.92")  # multi-component JPEG 2000: no handler


@pytest.fixture(scope="module")
def img() -> np.ndarray:
    return make.film(3)


def wheel_file(name: str) -> bytes:
    """A file shipped inside the pydicom wheel (never downloaded)."""
    path = pydicom.data.get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} is not shipped in this pydicom wheel")
    return Path(path).read_bytes()


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel().astype(float), b.ravel().astype(float))[0, 1])


class NoSegmenter:
    """A segmenter that fails the test when asked: the header must have decided first."""

    def find(self, *args, **kwargs):
        raise AssertionError("the image was decoded and segmented")

    find_many = find


# --------------------------------------------------------------------------- format and header


def test_part10_files_are_sniffed_as_dicom(img) -> None:
    data = make.mono8(img)
    assert dicom.is_dicom(data)
    assert sniff_format(data) == "dicom"
    assert not dicom.is_dicom(encode(img))
    with pytest.raises(NotAnImageError):  # "DICM" elsewhere than after the preamble
        sniff_format(b"DICM" + bytes(200))


def test_check_header_gives_format_width_and_height(img) -> None:
    assert img.shape == (300, 256)
    assert check_header(make.mono8(img)) == ("dicom", 256, 300)


def test_read_header_reports_the_files_attributes(img) -> None:
    ds = make.dataset(img, ViewPosition="AP", BodyPartExamined="THORAX", Modality="CR")
    header = dicom.read_header(make.to_bytes(ds))
    assert (header.study_uid, header.series_uid, header.sop_uid) == (
        ds.StudyInstanceUID,
        ds.SeriesInstanceUID,
        ds.SOPInstanceUID,
    )
    assert header.sop_class_uid == ds.SOPClassUID
    assert (header.modality, header.view_position, header.body_part) == ("CR", "AP", "THORAX")
    assert (header.rows, header.columns, header.frames) == (300, 256, 1)
    assert header.transfer_syntax == ds.file_meta.TransferSyntaxUID
    assert header.photometric == "MONOCHROME2"
    assert header.has_pixel_data


# --------------------------------------------------------------------------- decoding


def test_8bit_monochrome2_decodes_to_the_stored_pixels(img) -> None:
    decoded = dicom.decode(make.mono8(img))
    assert decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, img)


def test_monochrome1_12bit_is_inverted_after_its_window(img) -> None:
    np.testing.assert_array_equal(dicom.decode(make.mono1_12bit(img)), img)


def test_signed_16bit_goes_through_rescale_then_window(img) -> None:
    np.testing.assert_array_equal(dicom.decode(make.signed16(img)), img)


def test_signed_16bit_without_a_window_is_read_as_signed(img) -> None:
    # most stored values are negative: read as unsigned they would wrap and scramble the film
    decoded = dicom.decode(make.signed16(img, window=False))
    assert correlation(decoded, img) > 0.99


def test_window_centre_and_width_are_applied(img) -> None:
    stored = (img.astype(np.uint16) * 16).astype(np.uint16)
    centre, width = 1800.0, 1200.0
    data = make.dicom_bytes(stored, bits_stored=12, WindowCenter=centre, WindowWidth=width)
    # PS3.3 C.11.2.1.2.1, written out
    expected = np.clip((stored - (centre - 0.5)) / (width - 1) + 0.5, 0, 1) * 255
    decoded = dicom.decode(data).astype(float)
    assert np.abs(decoded - expected).max() <= 1.0
    assert (decoded == 0).mean() > 0.05  # the window really is narrower than the data
    assert (decoded == 255).mean() > 0.05


def test_first_of_several_windows_is_used(img) -> None:
    stored = (img.astype(np.uint16) * 16).astype(np.uint16)
    both = make.dicom_bytes(
        stored, bits_stored=12, WindowCenter=[1800.0, 600.0], WindowWidth=[1200.0, 400.0]
    )
    first = make.dicom_bytes(stored, bits_stored=12, WindowCenter=1800.0, WindowWidth=1200.0)
    second = make.dicom_bytes(stored, bits_stored=12, WindowCenter=600.0, WindowWidth=400.0)
    np.testing.assert_array_equal(dicom.decode(both), dicom.decode(first))
    assert not np.array_equal(dicom.decode(both), dicom.decode(second))


def test_without_a_window_12bit_gets_a_percentile_window(img) -> None:
    stored = (img.astype(np.uint16) * 4 + 900).astype(np.uint16)  # 900..1920 of 0..4095
    decoded = dicom.decode(make.dicom_bytes(stored, bits_stored=12))
    assert np.percentile(decoded, 0.5) <= 2
    assert np.percentile(decoded, 99.5) >= 253
    assert correlation(decoded, img) > 0.99


def test_voi_lut_sequence_is_preferred_to_the_window(img) -> None:
    # the LUT inverts; the window beside it would not
    decoded = dicom.decode(make.to_bytes(make.voi_lut_dataset(img)))
    np.testing.assert_array_equal(decoded, 255 - img)


def test_rgb_dicom_is_converted_to_gray(img) -> None:
    rgb = np.repeat(img[:, :, None], 3, axis=2)
    rgb[:, :, 0] = 0  # no red: gray is the green and blue share, BT.601 weights
    decoded = dicom.decode(make.dicom_bytes(rgb, photometric="RGB"))
    expected = (0.587 + 0.114) * img.astype(float)
    assert np.abs(decoded - expected).max() <= 1.0


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless])
@pytest.mark.parametrize("variant", ["mono8", "signed16"])
def test_compressed_syntaxes_decode_to_the_native_pixels(img, syntax, variant) -> None:
    if not get_encoder(syntax).is_available:
        pytest.skip(f"no installed encoder writes {syntax.name}")
    native = make.dataset(img) if variant == "mono8" else make.signed16_dataset(img)
    expected = dicom.decode(make.to_bytes(native))
    data = make.compressed(native, syntax)
    assert dicom.read_header(data).transfer_syntax == syntax
    np.testing.assert_array_equal(dicom.decode(data), expected)


WHEEL_FILMS = [
    "CT_small.dcm",  # signed 16-bit, rescale
    "MR_small.dcm",  # with a window
    "MR_small_bigendian.dcm",
    "MR_small_implicit.dcm",
    "MR_small_RLE.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "MR_small_jp2klossless.dcm",
    "JPEG2000.dcm",
    "693_J2KI.dcm",  # JPEG 2000 lossy, 14-bit signed
    "JPGExtended.dcm",  # JPEG extended, 12-bit
    "SC_rgb_jpeg_gdcm.dcm",  # JPEG lossless, RGB
    "SC_rgb_jpeg_dcmtk.dcm",  # JPEG baseline, YBR_FULL
    "SC_ybr_full_422_uncompressed.dcm",
    "examples_jpeg2k.dcm",  # YBR_RCT
    "examples_palette.dcm",  # PALETTE COLOR
    "JPEGLSNearLossless_16.dcm",
    "image_dfl.dcm",  # deflated dataset
]


@pytest.mark.parametrize("name", WHEEL_FILMS)
def test_pydicom_wheel_films_decode_to_varied_uint8(name) -> None:
    data = wheel_file(name)
    header = dicom.read_header(data)
    decoded = dicom.decode(data)
    assert decoded.dtype == np.uint8
    assert decoded.shape == (header.rows, header.columns)
    assert decoded.std() > 5


def test_one_film_in_every_transfer_syntax_decodes_alike() -> None:
    reference = dicom.decode(wheel_file("MR_small.dcm"))
    for name in (
        "MR_small_bigendian.dcm",
        "MR_small_implicit.dcm",
        "MR_small_RLE.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_jp2klossless.dcm",
    ):
        np.testing.assert_array_equal(dicom.decode(wheel_file(name)), reference, err_msg=name)


def test_a_jpeg_no_installed_decoder_reads_ends_corrupt_image() -> None:
    # JPEG-lossy.dcm: 12-bit JPEG that libjpeg refuses (misplaced marker) and Pillow cannot do
    with pytest.raises(CorruptImageError):
        dicom.decode(wheel_file("JPEG-lossy.dcm"))


def test_decode_grayscale_gives_dicom_on_the_png_scale(img) -> None:
    gray = decode_grayscale(make.mono1_12bit(img))
    np.testing.assert_allclose(gray, decode_grayscale(encode(img)), atol=1e-7)


@pytest.mark.parametrize("variant", ["mono8", "mono1_12bit", "signed16", "j2k"])
def test_dicom_and_png_of_one_film_give_the_same_model_input(img, variant) -> None:
    if variant == "j2k":
        data = make.compressed(make.dataset(img), JPEG2000Lossless)
    else:
        data = getattr(make, variant)(img)
    config = PreprocessConfig(crop_fraction=0.02, clahe=True)
    np.testing.assert_array_equal(preprocess(data, config), preprocess(encode(img), config))


# --------------------------------------------------------------------------- refusals


def test_multi_frame_is_refused_from_the_header(img) -> None:
    data = make.dicom_bytes(np.concatenate([img, img]), Rows=img.shape[0], NumberOfFrames=2)
    for refuse in (check_header, preprocess, dicom.decode):
        with pytest.raises(MultiFrameError) as caught:
            refuse(data)
        assert caught.value.code == "multi_frame"


@pytest.mark.parametrize("name", ["generated-sr", "test-SR.dcm", "rtplan.dcm", "waveform_ecg.dcm"])
def test_non_image_dicom_is_not_an_image(name) -> None:
    data = make.structured_report() if name == "generated-sr" else wheel_file(name)
    header = dicom.read_header(data)  # a readable header: what it holds is no image
    with pytest.raises(NotAnImageError) as caught:
        check_header(data)
    assert caught.value.code == "not_an_image"
    assert header.sop_class_uid


def test_huge_declared_size_is_refused_before_any_decoding() -> None:
    huge = make.declaring(60000, 60000)  # 3.6 gigapixels over 4 bytes of pixel data
    for refuse in (check_header, preprocess, dicom.decode):
        with pytest.raises(ImageTooLargeError) as caught:
            refuse(huge)
        assert caught.value.code == "image_too_large"
    with pytest.raises(ImageTooLargeError):
        check_header(make.declaring(101, 100), max_pixels=10_000)
    # the same kind of file under the limit reaches the decoder, which fails differently: the
    # refusal above came from the header, not from decoding
    with pytest.raises(CorruptImageError):
        dicom.decode(make.declaring(100, 100))


def _cut(data: bytes, where: str) -> bytes:
    return data[:140] if where == "meta" else data[:-300]


@pytest.mark.parametrize(
    ("variant", "where"), [("native", "pixels"), ("j2k", "pixels"), ("native", "meta")]
)
def test_truncated_dicom_is_refused_at_the_header(img, variant, where) -> None:
    ds = make.dataset(img)
    data = make.compressed(ds, JPEG2000Lossless) if variant == "j2k" else make.to_bytes(ds)
    with pytest.raises(TruncatedImageError) as caught:
        check_header(_cut(data, where))
    assert caught.value.code == "truncated_image"


@pytest.mark.parametrize("syntax", [MPEG2MPML, JPEG2000_PART2])
def test_transfer_syntax_without_a_handler_is_unsupported(syntax) -> None:
    data = make.encapsulated(syntax, make.film(1, 64, 64))
    assert not dicom.decodable(syntax)
    for refuse in (check_header, preprocess):
        with pytest.raises(UnsupportedTransferSyntaxError) as caught:
            refuse(data)
        assert caught.value.code == "unsupported_transfer_syntax"


@pytest.mark.parametrize("name", ["meta_missing_tsyntax.dcm", "badVR.dcm"])
def test_unparseable_dicom_is_invalid_dicom(name) -> None:
    with pytest.raises(InvalidDicomError) as caught:
        check_header(wheel_file(name))
    assert caught.value.code == "invalid_dicom"


def test_deflate_bomb_is_refused_while_inflating(img) -> None:
    ds = make.dataset(make.film(2, 10, 10), syntax=DeflatedExplicitVRLittleEndian)
    ds.add_new(0x00091010, "OB", bytes(20 << 20))  # 20 MiB of zeros deflate to ~20 KiB
    ds.add_new(0x00090010, "LO", "BOMB")
    data = make.to_bytes(ds)
    assert len(data) < 1 << 20
    with pytest.raises(ImageTooLargeError, match="inflates"):
        check_header(data, max_pixels=1000)  # 10x10 pixels are allowed: only inflation refuses
    zlib.decompress(data[dicom._file_meta(data)[0] :], -zlib.MAX_WBITS)  # a real deflate stream


# --------------------------------------------------------------------------- scope from the header


def scope_cases(keyword: str, code: str | None, values: tuple[str | None, ...]) -> list:
    return [pytest.param(keyword, value, code, id=f"{keyword}={value!r}") for value in values]


@pytest.mark.parametrize(
    ("keyword", "value", "code"),
    [
        *scope_cases("Modality", "not_chest_radiograph", ("CT", "MR", "US", "MG")),
        *scope_cases("Modality", None, ("CR", "DX", None)),
        *scope_cases(
            "ViewPosition", "not_frontal", ("LL", "RL", "LATERAL", "LLD", "RLD", "LAT", "lateral")
        ),
        *scope_cases("ViewPosition", None, ("AP", "PA", "", None)),
        *scope_cases("BodyPartExamined", "not_chest", ("SKULL", "ABDOMEN", "HAND")),
        *scope_cases(
            "BodyPartExamined", None, ("CHEST", "CHEST ", "chest", "THORAX", "Thorax", None)
        ),
    ],
)
def test_header_scope_by_one_attribute(keyword: str, value: str | None, code: str | None) -> None:
    """Modality, ViewPosition and BodyPartExamined each decide the scope alone (None: absent)."""
    header = dicom.read_header(make.mono8(make.film(1, 64, 64), **{keyword: value}))
    refusal = dicom.header_scope(header)
    assert (refusal.code if refusal else None) == code


def test_out_of_scope_header_is_refused_before_decoding_and_segmenting() -> None:
    # a CT header over pixel data too short to decode: the header must decide, and skip it
    ct = make.declaring(100, 100, Modality="CT")
    assert dicom.read_header(ct).modality == "CT"
    with pytest.raises(OutOfScopeError) as caught:
        preprocess(ct, PreprocessConfig(lung_crop=True), segmenter=NoSegmenter())
    assert caught.value.code == "not_chest_radiograph"


def test_lateral_header_skips_even_a_film_the_segmenter_would_take(img) -> None:
    data = make.mono8(img, ViewPosition="LL")
    with pytest.raises(OutOfScopeError) as caught:
        preprocess(data, PreprocessConfig(lung_crop=True), segmenter=NoSegmenter())
    assert caught.value.code == "not_frontal"


@pytest.fixture(scope="module")
def segmenter():
    from shared.lungs import DEFAULT_SEGMENTER_PATH, LungSegmenter

    return LungSegmenter(DEFAULT_SEGMENTER_PATH)


def test_a_header_silent_on_scope_leaves_it_to_the_segmenter(img, segmenter) -> None:
    from ml.synthetic import generate

    config = PreprocessConfig(lung_crop=True)
    silent = {"Modality": None, "ViewPosition": None, "BodyPartExamined": None}
    film = preprocess(make.mono8(img, **silent), config, segmenter=segmenter)
    np.testing.assert_array_equal(film, preprocess(encode(img), config, segmenter=segmenter))
    document = make.mono8(generate("document", 4), **silent)
    with pytest.raises(OutOfScopeError) as caught:
        preprocess(document, config, segmenter=segmenter)
    assert caught.value.code == "not_frontal_chest_xray"


# --------------------------------------------------------------------------- the code catalogue


def _all_subclasses(cls: type) -> list[type]:
    return [c for sub in cls.__subclasses__() for c in (sub, *_all_subclasses(sub))]


def _class_code(node: ast.ClassDef) -> str | None:
    for statement in node.body:
        if (
            isinstance(statement, ast.Assign)
            and [getattr(t, "id", None) for t in statement.targets] == ["code"]
            and isinstance(statement.value, ast.Constant)
        ):
            return statement.value.value
    return None


def image_error_codes_in_the_source() -> dict[str, str]:
    """{code: class} of every ImageError subclass the project's source defines, read from the
    source (a subclass in a module no test imported counts too)."""
    classes: dict[str, tuple[set[str], str | None]] = {}
    for package in ("api", "cli", "ml", "shared", "worker"):
        for path in sorted((REPO / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ClassDef):
                    bases = {getattr(b, "id", None) or getattr(b, "attr", "") for b in node.bases}
                    classes[node.name] = (bases, _class_code(node))
    family, grown = {"ImageError"}, True
    while grown:
        before = len(family)
        family |= {name for name, (bases, _) in classes.items() if bases & family}
        grown = len(family) > before
    return {
        code: name for name, (_, code) in classes.items() if name in family and code is not None
    }


def test_every_image_error_code_is_in_the_imaging_catalogue() -> None:
    defined = image_error_codes_in_the_source()
    assert {"invalid_image", "invalid_dicom", "multi_frame", "not_frontal"} <= set(defined)
    imported = [cls.code for cls in _all_subclasses(ImageError)]
    assert len(imported) == len(set(imported))  # one class per code
    assert set(imported) <= set(defined)
    catalogue = imaging.__doc__ or ""
    missing = sorted(code for code in defined if f"``{code}``" not in catalogue)
    assert not missing, f"image error codes missing from shared/imaging.py's table: {missing}"


def test_out_of_scope_codes_are_exactly_the_skipped_family() -> None:
    family = {OutOfScopeError, *_all_subclasses(OutOfScopeError)}
    assert {cls.code for cls in family} == OUT_OF_SCOPE_CODES
    assert len(family) == 5  # the lung check's, three header rules, and a child's film
    failures = {cls.code for cls in _all_subclasses(ImageError)} - OUT_OF_SCOPE_CODES
    assert {"invalid_dicom", "multi_frame", "unsupported_transfer_syntax"} <= failures


# --------------------------------------------------------------------------- de-identification


@pytest.fixture(scope="module")
def identified(img) -> bytes:
    return make.to_bytes(make.with_identity_everywhere(img, Modality="CR"))


def test_deidentified_file_holds_no_identifying_value(identified) -> None:
    marker = make.MARKER.encode()
    assert identified.count(marker) >= 25  # the marker really is everywhere in the original
    clean, _ = dicom.deidentify(identified)
    assert marker not in clean
    ds = pydicom.dcmread(io.BytesIO(clean))
    assert ds.PatientIdentityRemoved == "YES"
    assert "PS3.15" in " ".join(ds.DeidentificationMethod)
    assert not [e for e in ds if e.tag.is_private]
    assert "PatientName" not in ds
    assert "StudyDate" not in ds


def test_deidentified_file_decodes_to_the_same_pixels_and_scope(identified) -> None:
    clean, _ = dicom.deidentify(identified)
    np.testing.assert_array_equal(dicom.decode(clean), dicom.decode(identified))
    before, after = dicom.read_header(identified), dicom.read_header(clean)
    assert (after.modality, after.view_position, after.body_part) == ("CR", "PA", "CHEST")
    assert after.sop_class_uid == before.sop_class_uid
    assert after.transfer_syntax == before.transfer_syntax


def test_deidentify_returns_the_original_uids_and_writes_new_ones(identified) -> None:
    clean, header = dicom.deidentify(identified)
    assert header == dicom.read_header(identified)
    new = dicom.read_header(clean)
    for old_uid, new_uid in (
        (header.study_uid, new.study_uid),
        (header.series_uid, new.series_uid),
        (header.sop_uid, new.sop_uid),
    ):
        assert new_uid
        assert old_uid != new_uid
        assert old_uid.encode() not in clean


def test_deidentify_keeps_compressed_pixel_data_byte_for_byte(img) -> None:
    ds = make.with_identity_everywhere(img)
    original = make.compressed(ds, JPEG2000Lossless)
    clean, _ = dicom.deidentify(original)
    assert make.MARKER.encode() not in clean
    before = pydicom.dcmread(io.BytesIO(original))
    after = pydicom.dcmread(io.BytesIO(clean))
    assert after.file_meta.TransferSyntaxUID == JPEG2000Lossless
    assert after.PixelData == before.PixelData


def test_deidentify_keeps_lut_tables_but_not_their_free_text(img) -> None:
    original = make.to_bytes(make.voi_lut_dataset(img))
    clean, _ = dicom.deidentify(original)
    assert b"inverting test LUT" in original
    assert b"inverting test LUT" not in clean
    np.testing.assert_array_equal(dicom.decode(clean), 255 - img)


# ------------------------------------------------------------------------ the client's folder walk


def test_submit_collects_extensionless_dicom_and_skips_dicomdir(tmp_path, img) -> None:
    series = tmp_path / "DICOM" / "ST000" / "SE000"
    series.mkdir(parents=True)
    (series / "IM000000").write_bytes(make.mono8(img))
    (series / "IM000001.dcm").write_bytes(make.mono8(img))
    (tmp_path / "DICOMDIR").write_bytes(make.structured_report())  # the index: Part 10 too
    (tmp_path / "README").write_bytes(b"not an image, no extension")
    (tmp_path / "film.png").write_bytes(encode(img))
    found = {p.relative_to(tmp_path).as_posix() for p in collect_paths([tmp_path])}
    assert found == {"DICOM/ST000/SE000/IM000000", "DICOM/ST000/SE000/IM000001.dcm", "film.png"}


# --------------------------------------------------------------------------- real files


def test_real_dicom_samples_decode_and_monochrome1_comes_out_inverted() -> None:
    first = SAMPLES / "rsna-pneumonia-sample.dcm"
    inverted = SAMPLES / "rsna-pneumonia-sample-monochrome1.dcm"
    if not (first.is_file() and inverted.is_file()):
        pytest.skip(f"real DICOM samples not available: {SAMPLES} is absent (not in the repo)")
    a, b = first.read_bytes(), inverted.read_bytes()
    assert dicom.read_header(a).transfer_syntax == pydicom.uid.JPEGBaseline8Bit
    assert check_header(a) == ("dicom", 1024, 1024)
    assert dicom.header_scope(dicom.read_header(a)) is None  # CR, PA, CHEST
    da, db = dicom.decode(a), dicom.decode(b)
    assert da.std() > 20
    assert db.std() > 20
    assert correlation(da, db) < -0.99


def _real_films(folder: Path, per_source: int) -> list[tuple[str, np.ndarray]]:
    """The first ``per_source`` films of each adult source, decoded to 8-bit gray."""
    with open(folder / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    films = []
    for source in ("ieee8023", "nih", "actualmed"):
        for row in [r for r in rows if r["source"] == source][:per_source]:
            gray = cv2.imread(str(folder / row["file"]), cv2.IMREAD_GRAYSCALE)
            assert gray is not None, row["file"]
            films.append((row["file"], gray))
    return films


@pytest.mark.realdata
def test_model_scores_real_films_alike_as_dicom_and_as_png(real_data_dir) -> None:
    """The bundled model, called as the worker calls it, gives each real film the same
    probability (within 0.02) from every DICOM variant as from its PNG."""
    from shared.model_store import Classifier
    from shared.settings import DEFAULT_MAX_PIXELS, DEFAULT_MODEL_PATH

    classifier = Classifier.load(DEFAULT_MODEL_PATH)

    def model_input(data: bytes) -> np.ndarray:  # worker/processing.py's call
        return preprocess(
            data, classifier.info.preprocess, DEFAULT_MAX_PIXELS, segmenter=classifier.segmenter
        )

    variants = {
        "8-bit": make.mono8,
        "12-bit MONOCHROME1": make.mono1_12bit,
        "16-bit signed, rescaled": make.signed16,
        "JPEG 2000 lossless": lambda g: make.compressed(make.dataset(g), JPEG2000Lossless),
    }
    scored = 0
    for name, gray in _real_films(real_data_dir, per_source=2):
        try:
            png = model_input(encode(gray))
        except OutOfScopeError:
            continue  # the segmenter skips this film whatever its format: nothing to compare
        batch = np.stack([png, *(model_input(write(gray)) for write in variants.values())])
        probs = classifier.predict(batch)
        for label, prob in zip(variants, probs[1:], strict=True):
            assert abs(float(prob) - float(probs[0])) <= 0.02, f"{name} as {label}"
        scored += 1
    assert scored >= 3, "too few real films in scope to compare"
