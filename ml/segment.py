"""``cxr train-lungs``: the lung segmenter, trained on ``../shared/data/cxr-lungs``.

Invariant: the segmenter is validated on the *classifier's* validation patients (the same
patient split, seed and fraction as ``cxr train``), so no film the classifier is judged on was
seen by either network.  Mask value 127 ("ignore": devices and markup over the lungs) counts
neither as lung nor as background: it is left out of the loss and of Dice.

It also learns what has *no* lungs to find, from empty masks on: half of the out-of-scope
patients in ``../shared/data/cxr-scope`` (lateral films, CT slices; the other half is kept for
``cxr audit-scope``, and their patient ids are recorded in the metadata), and generated images
of :data:`TRAIN_KINDS` (seeds from :data:`TRAIN_SEED0` on; the audit uses other seeds, and two
kinds, :data:`AUDIT_ONLY_KINDS`, never appear in training at all).
"""

from __future__ import annotations

import csv
import datetime as dt
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ml.dataset import Record, patient_split, read_labels
from ml.synthetic import KINDS, generate
from shared.imaging import decode_grayscale
from shared.lungs import SEG_SIZE, build_unet, find_lungs, seg_input

AUDIT_ONLY_KINDS = ("limb", "cross_section")
TRAIN_KINDS = tuple(k for k in KINDS if k not in AUDIT_ONLY_KINDS)
TRAIN_SEED0 = 10_000
GENERATED_PER_KIND = 10
SCOPE_AUDIT_FRACTION = 0.5
REAL_NEGATIVE_REPEATS = 1  # more made it miss the fainter field of frontal films

log = logging.getLogger(__name__)


@dataclass
class SegmentOptions:
    data: Path  # the films (with manifest.csv)
    masks: Path  # the masks (with manifest.csv)
    out: Path
    scope: Path | None = None  # out-of-scope films (with manifest.csv: file, kind, patient)
    epochs: int = 80
    batch_size: int = 16
    learning_rate: float = 2e-3
    val_fraction: float = 0.2
    seed: int = 42
    progress: bool = True


def _mask_targets(mask8: np.ndarray) -> np.ndarray:
    """(SEG_SIZE, SEG_SIZE, 2): lung (0/1) and valid (0 where the annotator said 'ignore')."""
    small = cv2.resize(mask8, (SEG_SIZE, SEG_SIZE), interpolation=cv2.INTER_NEAREST)
    lung = (small >= 192).astype(np.float32)
    valid = ((small < 64) | (small >= 192)).astype(np.float32)
    return np.stack([lung, valid], axis=-1)


def load_pairs(data: Path, masks: Path, files: list[str]) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for name in files:
        gray = decode_grayscale((data / name).read_bytes())
        mask8 = cv2.imread(str(masks / (Path(name).stem + ".png")), cv2.IMREAD_GRAYSCALE)
        if mask8 is None or mask8.shape != gray.shape:
            raise ValueError(f"mask for {name} is missing or not the film's size")
        xs.append(seg_input(gray))
        ys.append(_mask_targets(mask8))
    return np.stack(xs)[..., None], np.stack(ys)


def dice(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per-image Dice of binary predictions against (lung, valid) targets."""
    p = (pred >= 0.5) & (target[..., 1] > 0)
    t = (target[..., 0] > 0) & (target[..., 1] > 0)
    inter = (p & t).sum(axis=(1, 2))
    total = p.sum(axis=(1, 2)) + t.sum(axis=(1, 2))
    return np.where(total > 0, 2 * inter / np.maximum(total, 1), 1.0)


def _loss(y_true: Any, y_pred: Any) -> Any:
    import tensorflow as tf

    lung, valid = y_true[..., 0:1], y_true[..., 1:2]
    p = tf.clip_by_value(y_pred, 1e-6, 1 - 1e-6)
    bce = -(lung * tf.math.log(p) + (1 - lung) * tf.math.log(1 - p))
    bce = tf.reduce_sum(bce * valid) / (tf.reduce_sum(valid) + 1.0)
    inter = tf.reduce_sum(p * lung * valid, axis=[1, 2, 3])
    total = tf.reduce_sum((p + lung) * valid, axis=[1, 2, 3])
    soft_dice = tf.reduce_mean((2 * inter + 1.0) / (total + 1.0))
    return bce + (1.0 - soft_dice)


def _dataset(x: np.ndarray, y: np.ndarray, opts: SegmentOptions) -> Any:
    import keras
    import tensorflow as tf

    geometric = keras.Sequential(
        [
            # flips are harmless for a mask (unlike for the classifier) and keep the network
            # from finding one side's field better than the other's
            keras.layers.RandomFlip("horizontal", seed=opts.seed),
            keras.layers.RandomRotation(0.03, fill_mode="constant", seed=opts.seed),
            keras.layers.RandomZoom((-0.25, 0.2), fill_mode="constant", seed=opts.seed),
            keras.layers.RandomTranslation(0.1, 0.1, fill_mode="constant", seed=opts.seed),
        ]
    )
    rng = tf.random.Generator.from_seed(opts.seed)

    def augment(xb: Any, yb: Any) -> Any:
        both = geometric(tf.concat([xb, yb], axis=-1), training=True)
        img, lung, valid = both[..., 0:1], both[..., 1:2], both[..., 2:3]
        n = tf.shape(img)[0]
        gamma = tf.exp(rng.uniform((n, 1, 1, 1), -0.5, 0.5))
        gain = rng.uniform((n, 1, 1, 1), 0.7, 1.3)
        img = tf.clip_by_value(tf.pow(tf.clip_by_value(img, 1e-4, 1.0), gamma) * gain, 0.0, 1.0)
        lung = tf.cast(lung >= 0.5, tf.float32)
        valid = tf.cast(valid >= 0.5, tf.float32)
        return img, tf.concat([lung, valid], axis=-1)

    return (
        tf.data.Dataset.from_tensor_slices((x, y))
        .shuffle(len(x), seed=opts.seed, reshuffle_each_iteration=True)
        .batch(opts.batch_size)
        .map(augment, num_parallel_calls=1, deterministic=True)
        .prefetch(2)
    )


def scope_split(scope: Path, seed: int = 42) -> tuple[list[Record], list[Record]]:
    """Out-of-scope films split by patient, stratified by kind: (training, audit)."""
    with open(scope / "manifest.csv", newline="", encoding="utf-8") as fh:
        records = [
            Record(row["file"], 0, row["kind"], row.get("patient", ""))
            for row in csv.DictReader(fh)
        ]
    return patient_split(records, SCOPE_AUDIT_FRACTION, seed)


def negatives(scope: Path | None, seed: int) -> tuple[np.ndarray, list[Record]]:
    """Inputs with nothing to find: the training half of the scope films, and generated images."""
    xs: list[np.ndarray] = []
    used: list[Record] = []
    if scope is not None:
        used, _ = scope_split(scope, seed)
        for r in used:
            xs += [
                seg_input(decode_grayscale((scope / r.file).read_bytes()))
            ] * REAL_NEGATIVE_REPEATS
    for kind in TRAIN_KINDS:
        for k in range(GENERATED_PER_KIND):
            xs.append(seg_input(generate(kind, TRAIN_SEED0 + k).astype(np.float32) / 255.0))
    return np.stack(xs)[..., None], used


def _split_files(opts: SegmentOptions) -> tuple[list[str], list[str]]:
    records = read_labels(opts.data / "manifest.csv")
    _, val = patient_split(records, opts.val_fraction, opts.seed)
    val_files = {r.file for r in val}
    with open(opts.masks / "manifest.csv", newline="", encoding="utf-8") as fh:
        masked = sorted(row["file"] for row in csv.DictReader(fh))
    return [f for f in masked if f not in val_files], [f for f in masked if f in val_files]


def train_segmenter(opts: SegmentOptions) -> dict[str, Any]:
    """Train, round to float16, report held-out Dice, write weights + metadata."""
    import keras
    import tensorflow as tf

    from shared.model_store import round_weights, save_weights, write_metadata

    keras.utils.set_random_seed(opts.seed)
    tf.config.experimental.enable_op_determinism()
    fit_files, val_files = _split_files(opts)
    log.info("segmenter: %d training masks, %d held-out masks", len(fit_files), len(val_files))
    x_fit, y_fit = load_pairs(opts.data, opts.masks, fit_files)
    x_val, y_val = load_pairs(opts.data, opts.masks, val_files)
    x_neg, scope_used = negatives(opts.scope, opts.seed)
    empty = np.zeros((len(x_neg), SEG_SIZE, SEG_SIZE, 2), np.float32)
    empty[..., 1] = 1.0  # every pixel is known background
    x_fit, y_fit = np.concatenate([x_fit, x_neg]), np.concatenate([y_fit, empty])
    model = build_unet(seed=opts.seed)
    model.compile(optimizer=keras.optimizers.Adam(opts.learning_rate), loss=_loss)
    schedule = keras.callbacks.LearningRateScheduler(
        lambda epoch: opts.learning_rate * 0.5 * (1 + np.cos(np.pi * epoch / opts.epochs))
    )
    history = model.fit(
        _dataset(x_fit, y_fit, opts),
        epochs=opts.epochs,
        callbacks=[schedule],
        verbose=(1 if sys.stdout.isatty() else 2) if opts.progress else 0,
    )
    round_weights(model)
    sha = save_weights(model, opts.out)
    pred = np.asarray(model(x_val, training=False))[..., 0] if len(x_val) else np.zeros((0,))
    scores = dice(pred, y_val) if len(x_val) else np.zeros(0)
    found = [find_lungs(m).frontal for m in pred]
    today = dt.datetime.now(dt.UTC)
    meta = {
        "version": f"cxr-lungs-unet{SEG_SIZE}-{today:%Y%m%d}-{sha[:8]}",
        "sha256": sha,
        "architecture": f"unet-{SEG_SIZE}-{model.count_params()}",
        "input": "grayscale, INTER_AREA to 128x128, histogram-equalised, [0, 1]",
        "created_at": today.isoformat(timespec="seconds"),
        "training": {
            "masks": len(fit_files),
            "negatives": {
                "scope_films": len(scope_used),
                "scope_patients": sorted({r.group for r in scope_used}),
                "generated_kinds": list(TRAIN_KINDS),
                "generated_per_kind": GENERATED_PER_KIND,
                "generated_seed0": TRAIN_SEED0,
            },
            "epochs": opts.epochs,
            "batch_size": opts.batch_size,
            "learning_rate": opts.learning_rate,
            "seed": opts.seed,
            "loss": [round(float(v), 5) for v in history.history["loss"]],
        },
        "validation": {
            "split": "the classifier's validation patients (patient_split, same seed/fraction)",
            "seed": opts.seed,
            "val_fraction": opts.val_fraction,
            "masks": len(val_files),
            "dice_mean": round(float(scores.mean()), 4) if len(scores) else None,
            "dice_median": round(float(np.median(scores)), 4) if len(scores) else None,
            "dice_min": round(float(scores.min()), 4) if len(scores) else None,
            "found_frontal": int(sum(found)),
        },
    }
    write_metadata(opts.out, meta)
    return meta
