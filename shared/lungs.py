"""Lung fields: a small U-Net segmenter, the crop box it gives, and the scope decision.

Invariant: every decision here is a pure function of the segmenter's mask, so training,
``cxr evaluate`` and the workers crop and skip exactly alike.  A film is cropped only when the
mask shows two lung fields of plausible size and place (:func:`find_lungs`); when it does not,
the film is *out of scope* (lateral view, CT slice, photograph, another body part) and is never
scored, and never cropped at random.

The segmenter sees the film as :func:`seg_input` makes it: grayscale, resized to ``SEG_SIZE``
square with ``INTER_AREA``, histogram-equalised (so pediatric, NIH and phone-photographed films
share one contrast).  TensorFlow is imported only when a segmenter is built or loaded.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

SEG_SIZE = 128
SEG_FILTERS = (8, 16, 32, 64)
DEFAULT_SEGMENTER_PATH = Path(__file__).resolve().parent.parent / "models" / "cxr-lungs.npz"

# Scope rules on the mask (fractions of the SEG_SIZE square).  Chosen on training patients'
# frontal films and generated images; measured in MODEL_CARD.md.
MIN_COMPONENT = 0.01  # specks below this are noise
MIN_PIECE = 0.3  # a third component counts as lung if at least this share of the largest
MIN_LUNG_AREA = 0.06  # both fields together
MAX_LUNG_AREA = 0.70
MIN_SIDE_SHARE = 0.10  # the smaller field holds at least this share of the lung area
CROP_MARGIN = 0.08  # of the box's size, added on every side


class SegmenterFileError(RuntimeError):
    """The segmenter's weights or metadata are missing, unreadable or fail their checksum."""


@dataclass(frozen=True)
class Box:
    """A crop box in fractions of the image (x0, y0 inclusive; x1, y1 exclusive)."""

    x0: float
    y0: float
    x1: float
    y1: float

    def pixels(self, width: int, height: int) -> tuple[int, int, int, int]:
        x0 = int(np.floor(self.x0 * width))
        y0 = int(np.floor(self.y0 * height))
        x1 = max(x0 + 1, int(np.ceil(self.x1 * width)))
        y1 = max(y0 + 1, int(np.ceil(self.y1 * height)))
        return x0, y0, min(x1, width), min(y1, height)


@dataclass(frozen=True)
class LungFinding:
    """What the mask says: whether it shows a frontal chest film, why not, and the crop box."""

    frontal: bool
    reason: str  # "ok" or why the film is out of scope
    area: float  # lung fraction of the image
    box: Box | None


def seg_input(gray: np.ndarray) -> np.ndarray:
    """Grayscale float image in [0, 1] -> the segmenter's (SEG_SIZE, SEG_SIZE) float32 input."""
    small = cv2.resize(gray.astype(np.float32), (SEG_SIZE, SEG_SIZE), interpolation=cv2.INTER_AREA)
    as8 = np.clip(small * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return cv2.equalizeHist(as8).astype(np.float32) / 255.0


def _lung_components(binary: np.ndarray) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """The pixels of the lung components, and (area, centroid x) of each, as fractions.

    The lungs are the two largest components, plus any other at least ``MIN_PIECE`` of the
    largest (a field split by a device); specks and stray blobs at the border are left out, so
    they cannot stretch the crop box.
    """
    n, labels, stats, centroids = cv2.connectedComponentsWithStats(binary.astype(np.uint8), 8)
    total = binary.size
    comps = sorted(
        (
            (stats[i, cv2.CC_STAT_AREA] / total, centroids[i][0] / binary.shape[1], i)
            for i in range(1, n)
            if stats[i, cv2.CC_STAT_AREA] / total >= MIN_COMPONENT
        ),
        reverse=True,
    )
    if comps:
        largest = comps[0][0]
        comps = comps[:2] + [c for c in comps[2:] if c[0] >= MIN_PIECE * largest]
    keep = np.isin(labels, [i for _, _, i in comps])
    return keep, [(a, cx) for a, cx, _ in comps]


def find_lungs(mask: np.ndarray, margin: float = CROP_MARGIN) -> LungFinding:
    """Decide from a lung-probability mask whether the film is frontal, and where to crop.

    Frontal means: lung area within [MIN_LUNG_AREA, MAX_LUNG_AREA], and lung on both sides of
    the midline, the smaller side holding at least MIN_SIDE_SHARE of it (a lateral view or a
    single blob fails this).  The box spans the lung components plus ``margin`` of its size.
    """
    binary = np.asarray(mask) >= 0.5
    keep, comps = _lung_components(binary)
    area = float(sum(a for a, _ in comps))
    # by pixels, not by component: two fields that touch are one component on both sides
    left = float(keep[:, : keep.shape[1] // 2].sum()) / keep.size
    share = float(min(left, area - left) / area) if area > 0 else 0.0
    if area < MIN_LUNG_AREA:
        return LungFinding(False, "no_lungs_found", area, None)
    if area > MAX_LUNG_AREA:
        return LungFinding(False, "lung_area_implausible", area, None)
    if share < MIN_SIDE_SHARE:
        return LungFinding(False, "not_two_lung_fields", area, None)
    ys, xs = np.nonzero(keep)
    h, w = binary.shape
    x0, x1 = xs.min() / w, (xs.max() + 1) / w
    y0, y1 = ys.min() / h, (ys.max() + 1) / h
    dx, dy = (x1 - x0) * margin, (y1 - y0) * margin
    box = Box(max(0.0, x0 - dx), max(0.0, y0 - dy), min(1.0, x1 + dx), min(1.0, y1 + dy))
    return LungFinding(True, "ok", area, box)


def crop(gray: np.ndarray, box: Box) -> np.ndarray:
    h, w = gray.shape[:2]
    x0, y0, x1, y1 = box.pixels(w, h)
    return gray[y0:y1, x0:x1]


def build_unet(seed: int | None = None) -> Any:
    """A small U-Net (about 120k parameters) for (SEG_SIZE, SEG_SIZE, 1) -> lung probability."""
    import keras
    from keras import layers

    init = keras.initializers.HeNormal(seed=seed)

    def block(x: Any, filters: int, name: str) -> Any:
        for k in (1, 2):
            x = layers.Conv2D(
                filters, 3, padding="same", kernel_initializer=init, name=f"{name}c{k}"
            )(x)
            x = layers.BatchNormalization(name=f"{name}bn{k}")(x)
            x = layers.Activation("relu", name=f"{name}r{k}")(x)
        return x

    inp = keras.Input((SEG_SIZE, SEG_SIZE, 1), name="film")
    skips = []
    x = inp
    for i, f in enumerate(SEG_FILTERS[:-1]):
        x = block(x, f, f"down{i}")
        skips.append(x)
        x = layers.MaxPooling2D(2, name=f"pool{i}")(x)
    x = block(x, SEG_FILTERS[-1], "bottom")
    for i, f in reversed(list(enumerate(SEG_FILTERS[:-1]))):
        x = layers.UpSampling2D(2, name=f"up{i}")(x)
        x = layers.Concatenate(name=f"cat{i}")([x, skips[i]])
        x = block(x, f, f"dec{i}")
    out = layers.Conv2D(1, 1, activation="sigmoid", name="lung")(x)
    return keras.Model(inp, out, name="cxr_lungs")


def read_segmenter_metadata(weights_path: Path, verify: bool = True) -> dict[str, Any]:
    from shared.model_store import metadata_path, sha256_file

    weights_path = Path(weights_path)
    if not weights_path.is_file():
        raise SegmenterFileError(f"segmenter weights not found: {weights_path}")
    try:
        meta = json.loads(metadata_path(weights_path).read_text())
    except (OSError, ValueError) as exc:
        raise SegmenterFileError(f"segmenter metadata unreadable: {exc}") from exc
    if verify and sha256_file(weights_path) != meta.get("sha256"):
        raise SegmenterFileError(f"checksum mismatch for {weights_path}")
    return meta


class LungSegmenter:
    """The U-Net loaded once, with a compiled batch function; ``masks`` gives probabilities."""

    def __init__(self, weights_path: Path) -> None:
        import tensorflow as tf

        # checksummed against its own metadata; that it is the segmenter a classifier was
        # trained with is read_model_info's check
        self.metadata = read_segmenter_metadata(weights_path)
        self.version = str(self.metadata["version"])
        self.sha256 = str(self.metadata["sha256"])
        self.model = build_unet()
        with np.load(weights_path) as npz:
            self.model.set_weights([npz[k].astype(np.float32) for k in sorted(npz.files)])
        self._fn = tf.function(
            lambda x: self.model(x, training=False),
            input_signature=[tf.TensorSpec((None, SEG_SIZE, SEG_SIZE, 1), tf.float32)],
            reduce_retracing=True,
        )
        self._fn(np.zeros((1, SEG_SIZE, SEG_SIZE, 1), np.float32))

    def masks(self, inputs: np.ndarray) -> np.ndarray:
        """(n, SEG_SIZE, SEG_SIZE) inputs from :func:`seg_input` -> lung probabilities."""
        if len(inputs) == 0:
            return np.zeros((0, SEG_SIZE, SEG_SIZE), np.float32)
        x = np.ascontiguousarray(inputs, np.float32)[..., None]
        return np.asarray(self._fn(x))[..., 0]

    def find(self, gray: np.ndarray, margin: float = CROP_MARGIN) -> LungFinding:
        return self.find_many([gray], margin)[0]

    def find_many(
        self, grays: Sequence[np.ndarray], margin: float = CROP_MARGIN
    ) -> list[LungFinding]:
        """:meth:`find` for many films with one call of the network: a call costs several
        milliseconds besides its work, as much as the work on one film (bench/bench_e2e.py)."""
        masks = self.masks(np.stack([seg_input(g) for g in grays])) if grays else []
        return [find_lungs(m, margin) for m in masks]
