"""``cxr train``: the paper's CNN on a folder with a ``manifest.csv``, split by patient.

The recipes share the model, the split, augmentation and optimiser; they differ only in the
parts that fight the source shortcut (pediatric negatives from one hospital, adult positives):

* ``paper``: the seed paper's preprocessing, class weights balanced between the two labels.
* ``robust``: borders cropped (burnt-in text, frames), CLAHE contrast normalisation, and sample
  weights that give COVID-19, *adult* non-COVID and pediatric non-COVID films fixed shares of the
  loss (0.5 / 0.3 / 0.2), so telling pediatric from adult films pays less.
* ``adult``: the robust preprocessing, trained on adult films only (ieee8023 + actualmed), classes
  balanced: the pediatric shortcut is not in the training data at all.

Every recipe splits the *same* way (by patient, over all sources), so all are validated on the
same held-out patients.  Early stopping watches a second patient split carved out of the
training patients, never the validation split, so the reported metrics are untouched by
model selection.
"""

from __future__ import annotations

import datetime as dt
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ml.dataset import ADULT_SOURCES, Record, fingerprint, load_images, patient_split, read_labels
from ml.metrics import auc_score, blocks_by_key, metric_block
from shared.imaging import DEFAULT_MAX_PIXELS, PreprocessConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recipe:
    preprocess: PreprocessConfig
    weighting: str  # "classes": two labels balanced; "groups": ROBUST_SHARES
    sources: tuple[str, ...] | None = None  # train only on these (None: all)


ROBUST_PREPROCESS = PreprocessConfig(crop_fraction=0.08, clahe=True)
RECIPES: dict[str, Recipe] = {
    "paper": Recipe(PreprocessConfig(), "classes"),
    "robust": Recipe(ROBUST_PREPROCESS, "groups"),
    "adult": Recipe(ROBUST_PREPROCESS, "classes", sources=ADULT_SOURCES),
}
ROBUST_SHARES = {"covid": 0.5, "adult-non-covid": 0.3, "pediatric-non-covid": 0.2}


@dataclass
class TrainOptions:
    data: Path
    out: Path
    recipe: str = "paper"
    epochs: int = 40
    patience: int = 8
    warmup_epochs: int = 5  # early stopping ignores these (a noisy AUC at epoch 1 must not win)
    batch_size: int = 32
    learning_rate: float = 3e-4
    val_fraction: float = 0.2
    stop_fraction: float = 0.15  # of the training patients, watched by early stopping
    seed: int = 42
    max_images: int = 0  # 0: all; else a patient-level random subset (for quick runs)
    threshold: float = 0.5
    max_pixels: int = DEFAULT_MAX_PIXELS
    progress: bool = True


def weight_group(r: Record) -> str:
    if r.label == 1:
        return "covid"
    return "adult-non-covid" if r.source in ADULT_SOURCES else "pediatric-non-covid"


def sample_weights(records: list[Record], weighting: str) -> np.ndarray:
    """Per-image loss weights, normalised to mean 1."""
    if weighting == "classes":
        keys = [str(r.label) for r in records]
        shares = dict.fromkeys(set(keys), 0.5)
    else:
        keys = [weight_group(r) for r in records]
        present = {k: v for k, v in ROBUST_SHARES.items() if k in keys}
        total = sum(present.values())
        shares = {k: v / total for k, v in present.items()}
    counts = {k: keys.count(k) for k in set(keys)}
    n = len(records)
    w = np.array([shares[k] * n / counts[k] for k in keys], np.float32)
    return w / w.mean()


def _subset(records: list[Record], max_images: int, seed: int) -> list[Record]:
    if not max_images or max_images >= len(records):
        return records
    _, subset = patient_split(records, val_fraction=max_images / len(records), seed=seed + 1)
    return subset


def evaluate_split(
    records: list[Record], probs: np.ndarray, threshold: float, n_boot: int = 1000
) -> dict[str, Any]:
    """Overall, adult (ieee8023 + actualmed) and per-source metrics of one split."""
    y = np.array([r.label for r in records])
    groups = [r.group for r in records]

    def block(mask: np.ndarray) -> dict[str, Any]:
        idx = np.flatnonzero(mask)
        return metric_block(y[idx], probs[idx], [groups[i] for i in idx], threshold, n_boot)

    sources = np.array([r.source for r in records])
    everything = np.ones(len(records), bool)
    result: dict[str, Any] = {"overall": block(everything)}
    adult = np.isin(sources, ADULT_SOURCES)
    if adult.any():
        result["adult"] = block(adult)
    result["by_source"] = blocks_by_key(y, probs, groups, sources, threshold, n_boot)
    negatives = y == 0
    ped = negatives & ~adult
    adult_neg = negatives & adult
    if ped.any() and adult_neg.any():
        # Among non-COVID films only: how well does the score tell adult from pediatric?
        # A model that learned "adult = COVID" scores this near 1; lungs alone would not.
        both = ped | adult_neg
        result["shortcut_auc_adult_vs_pediatric_negatives"] = auc_score(adult[both], probs[both])
    return result


def train(opts: TrainOptions) -> dict[str, Any]:
    """Train, round to float16, evaluate on the validation split, write weights + metadata."""
    import keras
    import tensorflow as tf

    from shared.model_def import build_model
    from shared.model_store import round_weights, save_weights, write_metadata

    if opts.recipe not in RECIPES:
        raise ValueError(f"unknown recipe {opts.recipe!r}; choose from {sorted(RECIPES)}")
    recipe = RECIPES[opts.recipe]
    config = recipe.preprocess
    keras.utils.set_random_seed(opts.seed)
    tf.config.experimental.enable_op_determinism()

    manifest = opts.data / "manifest.csv"
    records = _subset(read_labels(manifest), opts.max_images, opts.seed)
    train_recs, val_recs = patient_split(records, opts.val_fraction, opts.seed)
    if recipe.sources is not None:
        train_recs = [r for r in train_recs if r.source in recipe.sources]
    fit_recs, stop_recs = patient_split(train_recs, opts.stop_fraction, opts.seed + 1)
    groups = [{r.group for r in part} for part in (fit_recs, stop_recs, val_recs)]
    if groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2]:
        raise RuntimeError("a patient is on two sides of the split")
    log.info(
        "split: %d fit / %d early-stopping / %d validation images",
        len(fit_recs),
        len(stop_recs),
        len(val_recs),
    )
    train_set = load_images(opts.data, fit_recs, config, opts.max_pixels, opts.progress)
    stop_set = load_images(opts.data, stop_recs, config, opts.max_pixels, opts.progress)
    val_set = load_images(opts.data, val_recs, config, opts.max_pixels, opts.progress)
    for name, loaded in (("fit", train_set), ("early-stopping", stop_set), ("validation", val_set)):
        if loaded.unreadable:
            log.warning("%d unreadable %s images skipped", len(loaded.unreadable), name)
    train_recs, stop_recs, val_recs = train_set.records, stop_set.records, val_set.records

    augment = keras.Sequential(
        [
            keras.layers.RandomRotation(0.02, fill_mode="constant", seed=opts.seed),  # ~7 deg
            keras.layers.RandomTranslation(0.05, 0.05, fill_mode="constant", seed=opts.seed),
            keras.layers.RandomZoom(0.1, fill_mode="constant", seed=opts.seed),
            keras.layers.RandomBrightness(0.1, value_range=(0.0, 1.0), seed=opts.seed),
            keras.layers.RandomContrast(0.1, seed=opts.seed),
        ],
        name="augment",
    )  # no flips: the heart is on the left, markers have a side
    weights = sample_weights(train_recs, recipe.weighting)
    ds = (
        tf.data.Dataset.from_tensor_slices(
            (train_set.x, train_set.y.astype(np.float32)[:, None], weights)
        )
        .shuffle(len(train_recs), seed=opts.seed, reshuffle_each_iteration=True)
        .batch(opts.batch_size)
        .map(
            lambda x, y, w: (tf.clip_by_value(augment(x, training=True), 0.0, 1.0), y, w),
            num_parallel_calls=1,
            deterministic=True,
        )
        .prefetch(2)
    )
    model = build_model(seed=opts.seed)
    model.compile(
        optimizer=keras.optimizers.Adam(opts.learning_rate),
        loss="binary_crossentropy",
        metrics=[keras.metrics.AUC(name="auc")],
    )
    has_val_auc = len(set(stop_set.y.tolist())) == 2
    callbacks = []
    if has_val_auc:
        callbacks.append(
            keras.callbacks.EarlyStopping(
                monitor="val_auc",
                mode="max",
                patience=opts.patience,
                start_from_epoch=opts.warmup_epochs,
                restore_best_weights=True,
            )
        )
    history = model.fit(
        ds,
        validation_data=(
            (stop_set.x, stop_set.y.astype(np.float32)[:, None]) if len(stop_recs) else None
        ),
        epochs=opts.epochs,
        callbacks=callbacks,
        shuffle=False,  # the dataset shuffles itself, reproducibly
        verbose=(1 if sys.stdout.isatty() else 2) if opts.progress else 0,
    )
    round_weights(model)
    sha = save_weights(model, opts.out)
    probs = (
        np.asarray(model(val_set.x, training=False)).reshape(-1) if len(val_recs) else np.zeros(0)
    )
    validation = evaluate_split(val_recs, probs, opts.threshold) if len(val_recs) else {}
    stopper = next((c for c in callbacks if isinstance(c, keras.callbacks.EarlyStopping)), None)
    best_epoch = (
        stopper.best_epoch + 1
        if stopper is not None and stopper.best_weights is not None
        else len(history.history["loss"])
    )
    today = dt.datetime.now(dt.UTC)
    metadata = {
        "version": f"cxr-cnn-{opts.recipe}-{today:%Y%m%d}-{sha[:8]}",
        "sha256": sha,
        "architecture": "paper-cnn-5631169",
        "recipe": opts.recipe,
        "preprocess": config.to_dict(),
        "threshold": opts.threshold,
        "created_at": today.isoformat(timespec="seconds"),
        "training_data": {
            "manifest": str(manifest),
            "fingerprint": fingerprint(opts.data, records),
            "images": len(records),
        },
        "split": {
            "method": "patient-level, stratified by (source, label)",
            "seed": opts.seed,
            "val_fraction": opts.val_fraction,
            "stop_fraction": opts.stop_fraction,
            "train_sources": list(recipe.sources) if recipe.sources else "all",
            "train_images": len(train_recs),
            "early_stopping_images": len(stop_recs),
            "val_images": len(val_recs),
            "train_patients": len({r.group for r in train_recs}),
            "val_patients": len({r.group for r in val_recs}),
            "val_patient_ids": sorted({r.group for r in val_recs}),
            # every patient the model saw (fit + early stopping): `cxr evaluate` refuses to
            # count them as validation
            "train_patient_ids": sorted(
                {r.group for r in train_recs} | {r.group for r in stop_recs}
            ),
        },
        "training": {
            "epochs_run": len(history.history["loss"]),
            "best_epoch": best_epoch,
            "patience": opts.patience,
            "warmup_epochs": opts.warmup_epochs,
            "batch_size": opts.batch_size,
            "learning_rate": opts.learning_rate,
            "max_images": opts.max_images,
            "history": {
                k: [round(float(v), 5) for v in vals] for k, vals in history.history.items()
            },
        },
        "validation": validation,
    }
    write_metadata(opts.out, metadata)
    return metadata


def summary_lines(metadata: dict[str, Any]) -> list[str]:
    """Human summary of a training run's validation metrics."""
    lines = [f"model {metadata['version']}  sha256 {metadata['sha256']}"]
    val = metadata.get("validation", {})
    for key in ("overall", "adult"):
        if key in val:
            lines.append(f"  {key:8s} " + _fmt(val[key]))
    for source, block in val.get("by_source", {}).items():
        lines.append(f"  {source:8s} " + _fmt(block))
    if "shortcut_auc_adult_vs_pediatric_negatives" in val:
        lines.append(
            "  shortcut check (AUC adult vs pediatric among negatives): "
            f"{val['shortcut_auc_adult_vs_pediatric_negatives']}"
        )
    return lines


def _fmt(block: dict[str, Any]) -> str:
    parts = [f"n={block['n']}"]
    for name in ("accuracy", "sensitivity", "specificity", "auc"):
        v = block[name]["value"]
        ci = block[name]["ci95"]
        parts.append(
            f"{name}={'n/a' if v is None else f'{v:.3f}'}"
            + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
        )
    return "  ".join(parts)
