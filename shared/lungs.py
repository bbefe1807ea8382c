"""Lung fields and the scope decision: a small U-Net segmenter, the scope net, the crop box.

Invariant: every decision here is one pure function, :func:`decide`, of the segmenter's mask and
the scope net's two outputs, so training, ``cxr evaluate`` and the workers crop and skip exactly
alike.  A film is never cropped at random: its box is the lung fields' box, the found field
mirrored across the midline, or a fixed default box.

* The **lung rule** (:func:`find_lungs`, unchanged): two lung fields of plausible size and
  place.  A film it accepts keeps exactly the box it gave before the scope net existed, so the
  classifier's inputs for those films do not change.
* The **scope net** (:func:`build_scope_net`, ``models/cxr-scope.npz``) reads what the
  segmenter already has (its equalised input and its mask) and says ``frontal_chest`` and
  ``child``.  It takes the frontal films the lung rule misses (intensive-care films with tubes,
  lines, electrodes, one lung whited out, rotated) and recognises children's films, which are
  refused with ``pediatric_not_supported`` (the classifier is validated on adults only).
* The scope net lives beside the segmenter under a fixed name (:data:`SCOPE_NET_FILE`), its
  sha256 checked at load against its metadata, and the metadata must name the segmenter's
  sha256 (its inputs are that segmenter's masks).  A segmenter without that file beside it
  (an old model folder) decides by the lung rule alone, and says so in the log.

The segmenter sees the film as :func:`seg_input` makes it: grayscale, resized to ``SEG_SIZE``
square with ``INTER_AREA``, histogram-equalised (so pediatric, NIH and phone-photographed films
share one contrast).  TensorFlow is imported only when a network is built or loaded.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
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

# The scope net: beside the segmenter under this name (see the module docstring).
SCOPE_NET_FILE = "cxr-scope.npz"
SCOPE_OUTPUTS = ("frontal_chest", "child")
SCOPE_FILTERS = (16, 32, 48, 64)
SCOPE_POOL = 2  # the net reads the SEG_SIZE inputs averaged down to SEG_SIZE / SCOPE_POOL
# A field the scope net's frontal film shows alone is mirrored only when it is lung-sized: a
# speck says nothing about where the lungs are (then the default box is taken).
MIN_ONE_FIELD = 0.025
RULES = ("lungs_or_net", "net")  # how the lung rule and the scope net's frontal output combine
#: The reasons of a film that is scored (cropped); every other reason is a skip.
SCORED_REASONS = ("ok", "one_field_mirrored", "default_box")

log = logging.getLogger(__name__)


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
    """What the decision says: whether the film is scored (a frontal chest film of an adult),
    why not, and the crop box.

    ``reason`` is ``"ok"`` (two lung fields, today's box), ``"one_field_mirrored"`` or
    ``"default_box"`` for a film the scope net calls frontal; for a film that is not scored,
    why: the lung rule's reason, ``"not_frontal_by_scope_net"`` or ``"pediatric"``.
    """

    frontal: bool  # scored: in scope and cropped to ``box``
    reason: str
    area: float  # lung fraction of the image
    box: Box | None
    frontal_score: float | None = None  # the scope net's outputs, where it ran
    child_score: float | None = None


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


@dataclass(frozen=True)
class ScopeRule:
    """How the scope net's outputs decide, from its metadata (chosen on training patients)."""

    frontal_threshold: float
    child_threshold: float
    combine: str = "lungs_or_net"  # one of RULES
    default_box: Box = field(default_factory=lambda: Box(0.1, 0.1, 0.9, 0.9))

    @classmethod
    def from_metadata(cls, meta: dict[str, Any]) -> ScopeRule:
        d = meta["decision"]
        if d["combine"] not in RULES:
            raise SegmenterFileError(f"unknown scope rule {d['combine']!r}")
        return cls(
            frontal_threshold=float(d["frontal_threshold"]),
            child_threshold=float(d["child_threshold"]),
            combine=str(d["combine"]),
            default_box=Box(*(float(v) for v in d["default_box"])),
        )


def _widen(x0: float, y0: float, x1: float, y1: float, margin: float) -> Box:
    dx, dy = (x1 - x0) * margin, (y1 - y0) * margin
    return Box(max(0.0, x0 - dx), max(0.0, y0 - dy), min(1.0, x1 + dx), min(1.0, y1 + dy))


def mirrored_box(mask: np.ndarray, margin: float = CROP_MARGIN) -> Box | None:
    """The box of the lung found, united with its mirror image across the midline: where the
    other field, whited out or hidden under devices, must be.  None when what is found is too
    small to say where the lungs are.

    The midline is the image's: films are centred on the patient closely enough (the centre
    of the two fields' box lies within 0.05 of the image's on 90% of the frontal films in
    ``../shared/data/cxr``, sd 0.033), and the margin is added to the united box."""
    keep, comps = _lung_components(np.asarray(mask) >= 0.5)
    area = float(sum(a for a, _ in comps))
    if area < MIN_ONE_FIELD or area > MAX_LUNG_AREA:
        return None
    ys, xs = np.nonzero(keep)
    h, w = keep.shape
    x0, x1 = xs.min() / w, (xs.max() + 1) / w
    y0, y1 = ys.min() / h, (ys.max() + 1) / h
    return _widen(min(x0, 1.0 - x1), y0, max(x1, 1.0 - x0), y1, margin)


def decide(
    mask: np.ndarray,
    scores: tuple[float, float] | None,
    rule: ScopeRule | None,
    margin: float = CROP_MARGIN,
) -> LungFinding:
    """The scope decision and the crop box, from the mask and the scope net's
    (frontal_chest, child) outputs; without them (``scores`` or ``rule`` None), the lung rule.

    A film is frontal when the lung rule accepts it or the net's frontal output reaches its
    threshold (``combine="lungs_or_net"``; with ``"net"``, the net alone).  A frontal film whose
    child output reaches its threshold is refused as pediatric.  The box: the lung rule's where
    it accepts the film (today's box, exactly), else the found field mirrored across the midline
    (:func:`mirrored_box`), else the rule's fixed default box (never a random one).
    """
    lungs = find_lungs(mask, margin)
    if scores is None or rule is None:
        return lungs
    frontal_score, child_score = float(scores[0]), float(scores[1])
    by_net = frontal_score >= rule.frontal_threshold
    frontal = (lungs.frontal or by_net) if rule.combine == "lungs_or_net" else by_net
    if not frontal:
        reason = lungs.reason if not lungs.frontal else "not_frontal_by_scope_net"
        return LungFinding(False, reason, lungs.area, None, frontal_score, child_score)
    if child_score >= rule.child_threshold:
        return LungFinding(False, "pediatric", lungs.area, None, frontal_score, child_score)
    if lungs.frontal:
        return LungFinding(True, "ok", lungs.area, lungs.box, frontal_score, child_score)
    box = mirrored_box(mask, margin)
    if box is not None:
        return LungFinding(True, "one_field_mirrored", lungs.area, box, frontal_score, child_score)
    d = rule.default_box
    return LungFinding(
        True,
        "default_box",
        lungs.area,
        _widen(d.x0, d.y0, d.x1, d.y1, margin),
        frontal_score,
        child_score,
    )


def build_scope_net(seed: int | None = None, pooled_input: bool = False) -> Any:
    """The scope net (about 50k parameters): the segmenter's (SEG_SIZE, SEG_SIZE) input and
    mask, averaged down by SCOPE_POOL, through four conv blocks to two sigmoids,
    :data:`SCOPE_OUTPUTS`.  A flat head, not global pooling: where things are (two fields side
    by side, or one behind a spine) is what tells a frontal film from a lateral.

    ``pooled_input`` builds the same network without its first (weightless) pooling, for
    training on inputs pooled beforehand: its weights load into the full one unchanged.
    """
    import keras
    from keras import layers

    init = keras.initializers.HeNormal(seed=seed)
    small = SEG_SIZE // SCOPE_POOL
    if pooled_input:
        inp = keras.Input((small, small, 2), name="film_and_mask_pooled")
        x = inp
    else:
        inp = keras.Input((SEG_SIZE, SEG_SIZE, 2), name="film_and_mask")
        x = layers.AveragePooling2D(SCOPE_POOL, name="down")(inp)
    for i, f in enumerate(SCOPE_FILTERS):
        # the first block strides instead of pooling: the same view, at a quarter of the work
        x = layers.Conv2D(
            f, 3, strides=2 if i == 0 else 1, padding="same", kernel_initializer=init, name=f"c{i}"
        )(x)
        x = layers.BatchNormalization(name=f"bn{i}")(x)
        x = layers.Activation("relu", name=f"r{i}")(x)
        if i > 0:
            x = layers.MaxPooling2D(2, name=f"pool{i}")(x)
    x = layers.Flatten(name="flat")(x)
    x = layers.Dropout(0.3, seed=seed, name="drop")(x)
    out = layers.Dense(
        len(SCOPE_OUTPUTS),
        activation="sigmoid",
        kernel_initializer=keras.initializers.GlorotUniform(seed=seed),
        name="scope",
    )(x)
    return keras.Model(inp, out, name="cxr_scope")


def scope_net_path(segmenter_path: Path) -> Path:
    return Path(segmenter_path).with_name(SCOPE_NET_FILE)


def read_scope_metadata(
    weights_path: Path, segmenter_sha256: str | None = None, verify: bool = True
) -> dict[str, Any]:
    """The scope net's metadata, its weights checked against their sha256 and (given one)
    against the segmenter whose masks it was trained on."""
    from shared.model_store import metadata_path, sha256_file

    weights_path = Path(weights_path)
    if not weights_path.is_file():
        raise SegmenterFileError(f"scope net weights not found: {weights_path}")
    try:
        meta = json.loads(metadata_path(weights_path).read_text())
    except (OSError, ValueError) as exc:
        raise SegmenterFileError(f"scope net metadata unreadable: {exc}") from exc
    if verify and sha256_file(weights_path) != meta.get("sha256"):
        raise SegmenterFileError(f"checksum mismatch for {weights_path}")
    want = meta.get("segmenter", {}).get("sha256")
    if segmenter_sha256 is not None and want != segmenter_sha256:
        raise SegmenterFileError(
            f"{weights_path} was trained on another segmenter's masks "
            f"(sha256 {str(want)[:12]}, this segmenter is {segmenter_sha256[:12]})"
        )
    return meta


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
    """The U-Net, and the scope net beside it, loaded once, with one compiled batch function:
    :meth:`masks` gives lung probabilities, :meth:`find_many` the decisions.

    ``scope_net=True`` loads :data:`SCOPE_NET_FILE` from the segmenter's folder where it is
    there (checksummed; a file that fails its check is refused, never skipped); ``False``
    decides by the lung rule alone.
    """

    def __init__(self, weights_path: Path, scope_net: bool = True) -> None:
        import tensorflow as tf

        # checksummed against its own metadata; that it is the segmenter a classifier was
        # trained with is read_model_info's check
        self.metadata = read_segmenter_metadata(weights_path)
        self.version = str(self.metadata["version"])
        self.sha256 = str(self.metadata["sha256"])
        self.model = build_unet()
        with np.load(weights_path) as npz:
            self.model.set_weights([npz[k].astype(np.float32) for k in sorted(npz.files)])
        self.scope_metadata: dict[str, Any] | None = None
        self.scope_rule: ScopeRule | None = None
        self.scope_model: Any = None
        scope_path = scope_net_path(weights_path)
        if scope_net and scope_path.is_file():
            self.scope_metadata = read_scope_metadata(scope_path, self.sha256)
            self.scope_rule = ScopeRule.from_metadata(self.scope_metadata)
            self.scope_model = build_scope_net()
            with np.load(scope_path) as npz:
                self.scope_model.set_weights([npz[k].astype(np.float32) for k in sorted(npz.files)])
        elif scope_net:
            log.warning(
                "no scope net beside %s (%s): deciding scope by the lung rule alone",
                weights_path,
                SCOPE_NET_FILE,
            )
        spec = [tf.TensorSpec((None, SEG_SIZE, SEG_SIZE, 1), tf.float32)]
        if self.scope_model is None:
            self._fn = tf.function(
                lambda x: (self.model(x, training=False),),
                input_signature=spec,
                reduce_retracing=True,
            )
        else:

            def both(x: Any) -> Any:
                mask = self.model(x, training=False)
                scores = self.scope_model(tf.concat([x, mask], axis=-1), training=False)
                return mask, scores

            self._fn = tf.function(both, input_signature=spec, reduce_retracing=True)
        self._fn(np.zeros((1, SEG_SIZE, SEG_SIZE, 1), np.float32))

    @property
    def scope_version(self) -> str | None:
        return None if self.scope_metadata is None else str(self.scope_metadata["version"])

    @property
    def decision_key(self) -> str:
        """What the decisions depend on (for caches of preprocessed films): the segmenter's
        sha256, and the scope net's where one is loaded."""
        if self.scope_metadata is None:
            return self.sha256
        return f"{self.sha256}+{self.scope_metadata['sha256']}"

    def outputs(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(n, SEG_SIZE, SEG_SIZE) inputs from :func:`seg_input` -> lung probabilities, and the
        scope net's (n, 2) outputs (None without a scope net), from one call."""
        if len(inputs) == 0:
            empty = np.zeros((0, len(SCOPE_OUTPUTS)), np.float32)
            return np.zeros((0, SEG_SIZE, SEG_SIZE), np.float32), (
                None if self.scope_model is None else empty
            )
        x = np.ascontiguousarray(inputs, np.float32)[..., None]
        out = self._fn(x)
        masks = np.asarray(out[0])[..., 0]
        return masks, (np.asarray(out[1]) if len(out) > 1 else None)

    def masks(self, inputs: np.ndarray) -> np.ndarray:
        """(n, SEG_SIZE, SEG_SIZE) inputs from :func:`seg_input` -> lung probabilities."""
        return self.outputs(inputs)[0]

    def find(self, gray: np.ndarray, margin: float = CROP_MARGIN) -> LungFinding:
        return self.find_many([gray], margin)[0]

    def find_many(
        self, grays: Sequence[np.ndarray], margin: float = CROP_MARGIN
    ) -> list[LungFinding]:
        """:meth:`find` for many films with one call of the networks: a call costs several
        milliseconds besides its work, as much as the work on one film (bench/bench_e2e.py)."""
        if not grays:
            return []
        masks, scores = self.outputs(np.stack([seg_input(g) for g in grays]))
        if scores is None:
            return [decide(m, None, None, margin) for m in masks]
        return [
            decide(m, (float(s[0]), float(s[1])), self.scope_rule, margin)
            for m, s in zip(masks, scores, strict=True)
        ]
