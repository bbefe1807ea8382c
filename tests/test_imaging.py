"""The one preprocessing path: formats, sizes, exact resize, refusals and the bomb check."""

from __future__ import annotations

import io
import struct
import time
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image

from shared import imaging
from shared.imaging import (
    CorruptImageError,
    EmptyImageError,
    ImageError,
    ImageTooLargeError,
    NotAnImageError,
    PreprocessConfig,
    TruncatedImageError,
    check_header,
    preprocess,
    sniff_format,
)

SIZE = 224


# --------------------------------------------------------------------------- generators


def gray_image(height: int = 300, width: int = 256, seed: int = 0) -> np.ndarray:
    """A smooth, varied 8-bit grayscale image (smooth so that JPEG stays close)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = 40 + 150 * (xx / max(width - 1, 1)) + 40 * np.sin(yy / max(height, 1) * 6.0)
    img += rng.normal(0, 3, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def encode(img: np.ndarray, ext: str) -> bytes:
    ok, buf = cv2.imencode(ext, img)
    assert ok, ext
    return buf.tobytes()


def expected_input(gray8: np.ndarray) -> np.ndarray:
    """The paper's preprocessing, written out independently."""
    small = cv2.resize(gray8.astype(np.float32) / 255.0, (SIZE, SIZE), interpolation=cv2.INTER_AREA)
    return np.repeat(small[:, :, None], 3, axis=2)


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def png_declaring(width: int, height: int) -> bytes:
    """A well-formed PNG whose IHDR declares width x height, with a tiny IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    idat = zlib.compress(b"\x00" * 4096, 9)
    return (
        imaging.PNG_MAGIC
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def jpeg_declaring(width: int, height: int) -> bytes:
    """A real JPEG whose SOF0 marker is patched to declare width x height."""
    data = bytearray(encode(gray_image(32, 32), ".jpg"))
    sof = data.find(b"\xff\xc0")
    assert sof > 0
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def bmp_declaring(width: int, height: int) -> bytes:
    """A real BMP whose BITMAPINFOHEADER is patched to declare width x height."""
    data = bytearray(encode(gray_image(16, 16), ".bmp"))
    struct.pack_into("<ii", data, 18, width, height)
    return bytes(data)


def assert_valid_input(out: np.ndarray) -> None:
    assert out.shape == (SIZE, SIZE, 3)
    assert out.dtype == np.float32
    assert np.isfinite(out).all()
    assert out.min() >= 0.0
    assert out.max() <= 1.0
    assert np.array_equal(out[:, :, 0], out[:, :, 1])
    assert np.array_equal(out[:, :, 0], out[:, :, 2])


# --------------------------------------------------------------------------- formats


@pytest.mark.parametrize("ext", [".png", ".bmp", ".tif", ".tiff"])
def test_lossless_formats_give_the_exact_paper_preprocessing(ext: str) -> None:
    gray = gray_image()
    out = preprocess(encode(gray, ext))
    assert_valid_input(out)
    np.testing.assert_allclose(out, expected_input(gray), atol=1e-6)


def test_jpeg_is_close_to_its_source() -> None:
    gray = gray_image()
    out = preprocess(encode(gray, ".jpg"))
    assert_valid_input(out)
    assert np.abs(out - expected_input(gray)).mean() < 0.01


def test_resize_is_inter_area_not_linear() -> None:
    gray = gray_image(517, 389, seed=3)
    out = preprocess(encode(gray, ".png"))
    area = expected_input(gray)
    np.testing.assert_allclose(out, area, atol=1e-6)
    linear = cv2.resize(gray.astype(np.float32) / 255.0, (SIZE, SIZE), cv2.INTER_LINEAR)
    # the check above can tell the two interpolations apart on this image
    assert np.abs(area[:, :, 0] - linear).max() > 1e-3


@pytest.mark.parametrize("ext", [".png", ".tif"])
def test_16_bit_matches_8_bit(ext: str) -> None:
    gray8 = gray_image(seed=1)
    gray16 = gray8.astype(np.uint16) * 257
    data16 = encode(gray16, ext)
    assert cv2.imdecode(np.frombuffer(data16, np.uint8), cv2.IMREAD_UNCHANGED).dtype == np.uint16
    out16 = preprocess(data16)
    out8 = preprocess(encode(gray8, ".png"))
    assert_valid_input(out16)
    np.testing.assert_allclose(out16, out8, atol=1e-3)


def test_16_bit_uses_the_full_range() -> None:
    """A 16-bit image is divided by 65535, not by 255 and clipped (which would be all white)."""
    gray16 = np.full((50, 50), 32768, np.uint16)
    out = preprocess(encode(gray16, ".png"))
    np.testing.assert_allclose(out, 32768 / 65535, atol=1e-6)


def test_pillow_written_16_bit_png() -> None:
    gray16 = (gray_image(seed=2).astype(np.uint16) * 257).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(gray16).save(buf, format="PNG")
    out = preprocess(buf.getvalue())
    np.testing.assert_allclose(out, expected_input(gray16 // 257), atol=1e-3)


@pytest.mark.parametrize("ext", [".png", ".jpg", ".bmp", ".tif"])
def test_color_input_becomes_gray(ext: str) -> None:
    gray = gray_image(seed=4)
    bgr = np.dstack([gray, (gray // 2).astype(np.uint8), (255 - gray).astype(np.uint8)])
    out = preprocess(encode(bgr, ext))
    assert_valid_input(out)
    reference = expected_input(cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY))
    tolerance = 0.02 if ext == ".jpg" else 2.5 / 255
    assert np.abs(out - reference).mean() < tolerance


def test_color_png_with_alpha_becomes_gray() -> None:
    gray = gray_image(seed=5)
    bgra = np.dstack([gray, gray, gray, np.full_like(gray, 255)])
    out = preprocess(encode(bgra, ".png"))
    assert_valid_input(out)
    np.testing.assert_allclose(out, expected_input(gray), atol=2 / 255)


@pytest.mark.parametrize(("height", "width"), [(40, 3000), (3000, 40), (500, 7), (7, 500)])
def test_odd_aspect_ratios_keep_orientation(height: int, width: int) -> None:
    # brightness grows left to right: the output must too, and be constant down each column
    ramp = np.linspace(0, 255, width, dtype=np.float32)
    img = np.tile(ramp, (height, 1)).astype(np.uint8)
    out = preprocess(encode(img, ".png"))
    assert_valid_input(out)
    row = out[SIZE // 2, :, 0]
    assert row[-1] - row[0] > 0.9
    assert np.all(np.diff(row) >= -1e-6)
    assert np.abs(out[:, :, 0] - row[None, :]).max() < 1e-5


@pytest.mark.parametrize("ext", [".png", ".jpg", ".bmp", ".tif"])
@pytest.mark.parametrize("value", [0, 77, 255])
def test_one_pixel_image(ext: str, value: int) -> None:
    out = preprocess(encode(np.array([[value]], np.uint8), ext))
    assert_valid_input(out)
    np.testing.assert_allclose(out, value / 255.0, atol=1e-6)


@pytest.mark.parametrize(
    ("ext", "fmt"), [(".png", "png"), (".jpg", "jpeg"), (".bmp", "bmp"), (".tif", "tiff")]
)
def test_sniff_format_and_check_header(ext: str, fmt: str) -> None:
    data = encode(gray_image(30, 45), ext)
    assert sniff_format(data) == fmt
    assert check_header(data) == (fmt, 45, 30)


# --------------------------------------------------------------------------- refusals


def test_empty_bytes() -> None:
    with pytest.raises(EmptyImageError) as info:
        preprocess(b"")
    assert info.value.code == "empty_image"


@pytest.mark.parametrize(
    "data",
    [
        b"this is a plain text file, not an X-ray\n" * 10,
        b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\n",
        b"GIF89a\x01\x00\x01\x00\x00\x00\x00;",
        b"\x00",
    ],
    ids=["text", "pdf", "gif", "one-zero-byte"],
)
def test_not_an_image(data: bytes) -> None:
    with pytest.raises(NotAnImageError) as info:
        preprocess(data)
    assert info.value.code == "not_an_image"


@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_truncated_in_half(ext: str) -> None:
    data = encode(gray_image(seed=6), ext)
    with pytest.raises(TruncatedImageError) as info:
        preprocess(data[: len(data) // 2])
    assert info.value.code == "truncated_image"


@pytest.mark.parametrize("keep", [0.9, 0.99])
def test_truncated_bmp(keep: float) -> None:
    data = encode(gray_image(seed=7), ".bmp")
    with pytest.raises(TruncatedImageError):
        preprocess(data[: int(len(data) * keep)])


@pytest.mark.parametrize("cut", [9, 20, 33])
def test_png_cut_inside_its_header(cut: int) -> None:
    data = encode(gray_image(seed=8), ".png")
    with pytest.raises(TruncatedImageError):
        preprocess(data[:cut])


def _flip_idat_middle(data: bytes, fix_crc: bool) -> bytes:
    start = data.find(b"IDAT")
    assert start > 0
    (length,) = struct.unpack(">I", data[start - 4 : start])
    out = bytearray(data)
    mid = start + 4 + length // 2
    for k in range(mid, mid + 32):
        out[k] ^= 0xFF
    if fix_crc:
        crc = zlib.crc32(bytes(out[start : start + 4 + length])) & 0xFFFFFFFF
        struct.pack_into(">I", out, start + 4 + length, crc)
    assert out.rfind(b"IEND") > 0
    return bytes(out)


def test_png_with_corrupt_idat_and_bad_crc() -> None:
    data = encode(gray_image(seed=9), ".png")
    with pytest.raises(CorruptImageError) as info:
        preprocess(_flip_idat_middle(data, fix_crc=False))
    assert info.value.code == "corrupt_image"


def test_png_with_corrupt_deflate_stream_and_good_crc() -> None:
    data = encode(gray_image(seed=9), ".png")
    with pytest.raises(ImageError) as info:
        preprocess(_flip_idat_middle(data, fix_crc=True))
    assert isinstance(info.value, CorruptImageError | TruncatedImageError)


def test_png_with_garbage_ihdr() -> None:
    data = bytearray(encode(gray_image(seed=10), ".png"))
    data[16:29] = b"\xff" * 13  # width, height, depth, colour type... all nonsense
    with pytest.raises(ImageError) as info:
        preprocess(bytes(data))
    assert isinstance(info.value, CorruptImageError | ImageTooLargeError)


# --------------------------------------------------------------------------- size limits


def test_png_bomb_is_small_and_refused_quickly() -> None:
    bomb = png_declaring(40000, 40000)
    assert len(bomb) < 4096
    assert check_header(png_declaring(4, 4))[1:] == (4, 4)  # the builder makes valid headers
    start = time.perf_counter()
    with pytest.raises(ImageTooLargeError) as info:
        preprocess(bomb)
    assert time.perf_counter() - start < 1.0
    assert info.value.code == "image_too_large"


@pytest.mark.parametrize(
    "bomb",
    [png_declaring(40000, 40000), jpeg_declaring(60000, 60000), bmp_declaring(30000, 30000)],
    ids=["png", "jpeg", "bmp"],
)
def test_bomb_refused_from_the_header_without_decoding(
    bomb: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_decode(*args: object, **kwargs: object) -> None:
        raise AssertionError("cv2.imdecode must not be called for an oversized image")

    monkeypatch.setattr(imaging.cv2, "imdecode", no_decode)
    with pytest.raises(ImageTooLargeError):
        check_header(bomb)
    with pytest.raises(ImageTooLargeError):
        preprocess(bomb)


def test_decode_is_reached_for_normal_images(monkeypatch: pytest.MonkeyPatch) -> None:
    """Counterpart of the test above: the patch would catch a decode."""
    calls: list[int] = []
    real = cv2.imdecode

    def spy(*args: object, **kwargs: object) -> np.ndarray:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(imaging.cv2, "imdecode", spy)
    preprocess(encode(gray_image(20, 20), ".png"))
    assert calls == [1]


@pytest.mark.parametrize(
    ("max_pixels", "ok"), [(100, False), (399, False), (400, True), (10_000, True)]
)
def test_configurable_pixel_limit(max_pixels: int, ok: bool) -> None:
    data = encode(gray_image(20, 20), ".png")
    if ok:
        assert_valid_input(preprocess(data, max_pixels=max_pixels))
    else:
        with pytest.raises(ImageTooLargeError):
            preprocess(data, max_pixels=max_pixels)


# --------------------------------------------------------------------------- options


def test_crop_and_clahe_change_the_output_but_keep_it_valid() -> None:
    data = encode(gray_image(seed=11), ".png")
    plain = preprocess(data)
    robust = preprocess(data, PreprocessConfig(crop_fraction=0.1, clahe=True))
    assert_valid_input(robust)
    assert np.abs(robust - plain).mean() > 0.01


def test_crop_removes_a_border_frame() -> None:
    img = np.full((400, 400), 100, np.uint8)
    img[:20, :] = img[-20:, :] = img[:, :20] = img[:, -20:] = 255  # 5% white frame
    data = encode(img, ".png")
    assert preprocess(data).max() == pytest.approx(1.0)
    cropped = preprocess(data, PreprocessConfig(crop_fraction=0.1))
    np.testing.assert_allclose(cropped, 100 / 255, atol=1e-6)


def test_clahe_is_applied_after_resizing_on_8_bit_values() -> None:
    img = gray_image(seed=12)
    low = (100 + (img.astype(np.float32) - 128) * 0.3).astype(np.uint8)  # low contrast
    data = encode(low, ".png")
    plain = preprocess(data)
    equalised = preprocess(data, PreprocessConfig(clahe=True))
    assert_valid_input(equalised)
    as8 = np.clip(plain[:, :, 0] * 255.0 + 0.5, 0, 255).astype(np.uint8)
    reference = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(as8) / 255.0
    np.testing.assert_allclose(equalised[:, :, 0], reference, atol=1e-6)
    assert np.abs(equalised - plain).mean() > 0.005
    assert equalised.std() > plain.std()


def test_preprocess_config_round_trip() -> None:
    config = PreprocessConfig(crop_fraction=0.05, clahe=True)
    assert PreprocessConfig.from_dict(config.to_dict()) == config
    assert PreprocessConfig.from_dict(None) == PreprocessConfig()
    assert PreprocessConfig.from_dict({}) == imaging.PAPER


def test_every_image_error_has_a_distinct_stable_code() -> None:
    classes = [
        EmptyImageError,
        NotAnImageError,
        TruncatedImageError,
        CorruptImageError,
        ImageTooLargeError,
    ]
    assert set(ImageError.__subclasses__()) >= set(classes)
    codes = [cls.code for cls in ImageError.__subclasses__()]
    assert len(codes) == len(set(codes))
    assert ImageError.code not in codes
    assert {cls.code for cls in classes} == {
        "empty_image",
        "not_an_image",
        "truncated_image",
        "corrupt_image",
        "image_too_large",
    }
    for cls in classes:
        assert issubclass(cls, ValueError)
        assert cls("message").message == "message"


def test_jpeg_with_data_appended_after_its_end_marker_is_accepted() -> None:
    data = encode(gray_image(), ".jpg") + b"\0" * 5000  # e.g. a phone's motion-photo trailer
    assert_valid_input(preprocess(data))


def test_jpeg_cut_inside_its_header_is_truncated() -> None:
    data = encode(gray_image(), ".jpg")
    sos = data.index(b"\xff\xda")
    with pytest.raises(TruncatedImageError):
        preprocess(data[: sos - 10])
