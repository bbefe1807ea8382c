"""The lung-field step: the crop box and the scope decision from a mask, and the segmenter."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from ml.synthetic import KINDS, generate, lung_box, png_bytes
from shared.imaging import (
    OutOfScopeError,
    PreprocessConfig,
    decode_grayscale,
    preprocess,
    to_model_input,
)
from shared.lungs import SEG_SIZE, Box, build_unet, crop, find_lungs
from tests.factories import encode, xray_like


def two_lungs(size: int = SEG_SIZE, left=(0.3, 0.5), right=(0.7, 0.5), axes=(0.12, 0.25)):
    """A mask with two filled ellipses ('lung fields') at the given centres (fractions)."""
    mask = np.zeros((size, size), np.float32)
    for cx, cy in (left, right):
        centre = (int(cx * size), int(cy * size))
        cv2.ellipse(mask, centre, (int(axes[0] * size), int(axes[1] * size)), 0, 0, 360, 1.0, -1)
    return mask


@pytest.mark.parametrize(
    ("left", "right", "axes", "expected"),
    [
        ((0.3, 0.5), (0.7, 0.5), (0.12, 0.25), (0.18, 0.25, 0.82, 0.75)),
        ((0.25, 0.35), (0.55, 0.35), (0.1, 0.15), (0.15, 0.20, 0.65, 0.50)),  # off centre
    ],
)
def test_two_lung_fields_are_frontal_and_the_box_is_where_they_are(left, right, axes, expected):
    finding = find_lungs(two_lungs(left=left, right=right, axes=axes), margin=0.0)
    assert finding.frontal
    assert finding.reason == "ok"
    box = finding.box
    assert box is not None
    assert (box.x0, box.y0, box.x1, box.y1) == pytest.approx(expected, abs=0.02)


def test_margin_widens_the_box_by_its_share_of_the_box() -> None:
    tight = find_lungs(two_lungs(), margin=0.0).box
    wide = find_lungs(two_lungs(), margin=0.1).box
    assert tight is not None
    assert wide is not None
    width = tight.x1 - tight.x0
    assert wide.x0 == pytest.approx(tight.x0 - 0.1 * width, abs=1e-6)
    assert wide.x1 == pytest.approx(tight.x1 + 0.1 * width, abs=1e-6)


def test_a_stray_speck_does_not_stretch_the_box() -> None:
    mask = two_lungs()
    cv2.circle(mask, (3, 3), 5, 1.0, -1)  # a blob in the corner, well above noise size
    box = find_lungs(mask, margin=0.0).box
    assert box is not None
    assert box.x0 > 0.15
    assert box.y0 > 0.2


def test_no_lungs_means_no_crop() -> None:
    finding = find_lungs(np.zeros((SEG_SIZE, SEG_SIZE), np.float32))
    assert not finding.frontal
    assert finding.box is None
    assert finding.reason == "no_lungs_found"


def test_one_lung_field_is_not_a_frontal_film() -> None:
    mask = np.zeros((SEG_SIZE, SEG_SIZE), np.float32)
    cv2.ellipse(mask, (40, 64), (25, 40), 0, 0, 360, 1.0, -1)  # one field, left of the midline
    finding = find_lungs(mask)
    assert finding.reason == "not_two_lung_fields"
    assert finding.box is None


def test_lungs_filling_the_image_are_implausible() -> None:
    finding = find_lungs(np.ones((SEG_SIZE, SEG_SIZE), np.float32))
    assert finding.reason == "lung_area_implausible"
    assert finding.box is None


def test_low_probabilities_are_not_lungs() -> None:
    assert find_lungs(two_lungs() * 0.4).reason == "no_lungs_found"


def test_crop_takes_the_box_in_image_pixels() -> None:
    gray = np.arange(100 * 200, dtype=np.float32).reshape(100, 200)
    out = crop(gray, Box(0.25, 0.1, 0.75, 0.5))
    assert out.shape == (40, 100)
    assert out[0, 0] == gray[10, 50]


def test_segmenter_is_small() -> None:
    assert build_unet().count_params() < 1_000_000


# --------------------------------------------------------------------- the bundled segmenter


@pytest.fixture(scope="module")
def segmenter():
    from shared.lungs import DEFAULT_SEGMENTER_PATH, LungSegmenter

    return LungSegmenter(DEFAULT_SEGMENTER_PATH)


@pytest.mark.parametrize(("seed", "height", "width"), [(1, 300, 256), (2, 200, 256), (3, 480, 400)])
def test_segmenter_crops_a_generated_film_to_its_lung_fields(segmenter, seed, height, width):
    """The box holds both drawn lung fields and not much else (the lungs' box is where the
    generator drew them; the segmenter may add a little below, as it does behind the heart)."""
    gray = xray_like(seed, height, width).astype(np.float32) / 255.0
    finding = segmenter.find(gray, margin=0.0)
    assert finding.frontal, finding
    box = finding.box
    assert box is not None
    x0, y0, x1, y1 = lung_box(seed, height, width)
    slack = 0.05
    assert box.x0 <= x0 + slack
    assert box.y0 <= y0 + slack
    assert box.x1 >= x1 - slack
    assert box.y1 >= y1 - slack
    area = (box.x1 - box.x0) * (box.y1 - box.y0)
    assert area <= 1.8 * (x1 - x0) * (y1 - y0)


@pytest.mark.parametrize("kind", KINDS)
def test_segmenter_finds_no_lungs_in_generated_non_chest_images(segmenter, kind):
    for seed in range(3):
        gray = generate(kind, seed).astype(np.float32) / 255.0
        assert not segmenter.find(gray).frontal, (kind, seed)


def test_preprocess_skips_an_image_without_lungs_and_crops_one_with_them(segmenter):
    config = PreprocessConfig(lung_crop=True)
    with pytest.raises(OutOfScopeError) as caught:
        preprocess(png_bytes(generate("document", 4)), config, segmenter=segmenter)
    assert caught.value.code == "not_frontal_chest_xray"
    film = encode(xray_like(5))
    cropped = preprocess(film, config, segmenter=segmenter)
    whole = preprocess(film, PreprocessConfig())
    assert cropped.shape == whole.shape == (224, 224, 3)
    # the input is the film cropped to the box the segmenter found (whose place the test above
    # checks), at the configured margin
    gray = decode_grayscale(film)
    box = segmenter.find(gray, config.lung_margin).box
    assert box is not None
    np.testing.assert_array_equal(cropped, to_model_input(crop(gray, box)))
    assert np.abs(cropped - whole).mean() > 0.02


def test_a_lung_crop_model_needs_its_segmenter() -> None:
    with pytest.raises(RuntimeError, match="segmenter"):
        preprocess(encode(xray_like(1)), PreprocessConfig(lung_crop=True))


def test_preprocess_many_gives_what_preprocess_gives_film_by_film(segmenter):
    """The batched path (one segmenter call for a chunk, as the workers run it) keeps each
    film's outcome in its place: the same inputs to within float rounding, the same refusals."""
    from concurrent.futures import ThreadPoolExecutor

    from shared.imaging import ImageError, preprocess_many

    config = PreprocessConfig(lung_crop=True)
    files = [
        encode(xray_like(7)),
        png_bytes(generate("document", 4)),  # out of scope
        b"not an image",
        encode(xray_like(8, 480, 400)),
    ]
    with ThreadPoolExecutor(2) as pool:
        many = preprocess_many(files, config, segmenter=segmenter, mapper=pool.map)
    assert [type(x).__name__ for x in many[1:3]] == ["OutOfScopeError", "NotAnImageError"]
    for data, batched in zip(files, many, strict=True):
        if isinstance(batched, ImageError):
            with pytest.raises(type(batched)):
                preprocess(data, config, segmenter=segmenter)
        else:
            np.testing.assert_allclose(
                batched, preprocess(data, config, segmenter=segmenter), atol=1e-5
            )


@pytest.mark.realdata
def test_scope_targets_on_real_films(segmenter, real_data_dir) -> None:
    """Real lateral and CT films the segmenter never trained on are scored <= 10% of the time;
    frontal films of the validation patients are skipped as not frontal <= 1% of the time
    (children's films refused as pediatric are frontal: tests/test_scope_net.py has those)."""
    import csv

    from ml.dataset import patient_split, read_labels
    from shared.imaging import decode_grayscale

    scope_dir = real_data_dir.parent / "cxr-scope"
    if not (scope_dir / "manifest.csv").is_file():
        pytest.skip(f"real out-of-scope films not available: {scope_dir} is absent")
    seen = set(segmenter.metadata["training"]["negatives"]["scope_patients"])
    with open(scope_dir / "manifest.csv", newline="") as fh:
        unseen = [row["file"] for row in csv.DictReader(fh) if row["patient"] not in seen]
    assert len(unseen) >= 20
    scored = sum(
        segmenter.find(decode_grayscale((scope_dir / f).read_bytes())).frontal for f in unseen
    )
    assert scored <= 0.10 * len(unseen)
    _, val = patient_split(read_labels(real_data_dir / "manifest.csv"), 0.2, 42)
    findings = [
        segmenter.find(decode_grayscale((real_data_dir / r.file).read_bytes())) for r in val
    ]
    skipped = sum(f.box is None and f.reason != "pediatric" for f in findings)
    assert skipped <= 0.01 * len(val)
