"""``cxr train``: the paper's CNN on a folder with a ``manifest.csv``, split by patient.

The recipes share the model, the split, augmentation and optimiser; they differ in the parts
that fight the source shortcuts (pediatric negatives from one hospital, adult NIH negatives from
another, adult positives from many):

* ``paper``: the seed paper's preprocessing, class weights balanced between the two labels.
* ``lungs``: each film cropped to its lung fields by the segmenter (``cxr train-lungs``), films
  with no lung fields skipped, and loss shares per group (:data:`GROUP_SHARES`) so that the few
  same-source adult non-COVID films weigh as much as the many NIH ones, pediatric films less.
* ``lungs-clahe``: ``lungs`` plus CLAHE contrast normalisation.
* ``lungs-adult`` (shipped): ``lungs`` trained on adult films only (ieee8023, actualmed, NIH):
  the pediatric shortcut is not in the training data at all (validated on every source all the
  same), with :data:`ADULT_SHARES` and early stopping on the adult AUC.

Invariants: every recipe splits the *same* way (by patient, stratified by source and label,
over all sources), so all are validated on the same held-out patients.  Early stopping,
calibration and the threshold use a second patient split carved out of the training patients
(the early-stopping split), never the validation split, so the reported metrics are untouched
by model selection.  ``--hold-out-source`` removes a whole source from training and validates
on all of it: the closest thing in the data to a hospital the model never saw.
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ml.calibration import calibrate_and_choose
from ml.dataset import (
    ADULT_SOURCES,
    NIH_SOURCE,
    PEDIATRIC_SOURCES,
    SAME_SOURCE_ADULT,
    ArrayCache,
    LoadedSet,
    Record,
    fingerprint,
    load_images,
    patient_split,
    read_labels,
)
from ml.metrics import fmt
from ml.report import report_lines, validation_report
from shared.imaging import DEFAULT_MAX_PIXELS, PreprocessConfig
from shared.lungs import DEFAULT_SEGMENTER_PATH, LungSegmenter, scope_net_path
from shared.model_def import PAPER_ARCHITECTURE, SMALL_ARCHITECTURE
from shared.model_store import calibrate, sha256_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Schedule:
    """How long to train and how early stopping chooses the epoch (on the early-stopping split).

    ``loss`` watches the recipe's weighted loss: smooth, but a network that learns adults late
    stops near chance, hence the long warm-up.  ``adult_auc`` watches the adult AUC (same-source
    and NIH non-COVID films weighted half each): what matters, but with ~15 same-source non-COVID
    films it jumps by 0.2 between epochs, and a run with a higher learning rate chose an epoch that
    ranked validation adults worse than chance (MODEL_CARD.md)."""

    epochs: int = 60
    patience: int = 10
    warmup_epochs: int = 20
    monitor: str = "loss"


@dataclass(frozen=True)
class Recipe:
    """What is trained, and on what.  The levers after ``schedule`` are measured one at a time
    on the same cross-validation folds (``cxr cv``, MODEL_CARD.md) and kept only if they help."""

    preprocess: PreprocessConfig
    shares: Mapping[str, float] | None  # loss share per weight_group; None: labels balanced
    sources: tuple[str, ...] | None = None  # train only on these (None: all); validate on all
    schedule: Schedule = Schedule()
    architecture: str = PAPER_ARCHITECTURE  # shared.model_def.ARCHITECTURES
    augment: str = "basic"  # ml.augment.AUGMENTS
    sampling: str = "weighted"  # "weighted" (loss shares) or "balanced" (source x label draws)
    adversary: float = 0.0  # weight of the label-conditioned source-adversarial loss; 0: none
    seeds: int = 1  # an ensemble of this many networks (seeds seed, seed+1, ...)
    tta: bool = False  # average each network over test-time shifts and zooms


GROUP_SHARES = {
    "covid": 0.5,
    "same-source-non-covid": 0.2,
    "nih-non-covid": 0.2,
    "pediatric-non-covid": 0.1,
}
ADULT_SHARES = {"covid": 0.5, "same-source-non-covid": 0.2, "nih-non-covid": 0.15}
LUNGS = PreprocessConfig(lung_crop=True)
RECIPES: dict[str, Recipe] = {
    "paper": Recipe(PreprocessConfig(), None),
    "lungs": Recipe(LUNGS, GROUP_SHARES),
    "lungs-clahe": Recipe(PreprocessConfig(lung_crop=True, clahe=True), GROUP_SHARES),
    "lungs-adult": Recipe(
        LUNGS,
        ADULT_SHARES,
        sources=ADULT_SOURCES,
        schedule=Schedule(epochs=40, patience=8, warmup_epochs=5, monitor="adult_auc"),
    ),
}
_ADULT = RECIPES["lungs-adult"]
#: the schedule every ``cxr cv`` sweep of issue 17 ran with (MODEL_CARD.md)
SWEEP_SCHEDULE = Schedule(epochs=30, patience=6, warmup_epochs=5, monitor="adult_auc")
_SMALL = replace(_ADULT, architecture=SMALL_ARCHITECTURE, schedule=SWEEP_SCHEDULE)
#: The levers of issue 17, each one change from ``small-adult`` (or, the first, from
#: ``lungs-adult``): compared on the same folds by ``cxr cv``.
RECIPES.update(
    {
        "small-adult": _SMALL,
        "small-adult-zscore": replace(
            _SMALL, preprocess=PreprocessConfig(lung_crop=True, zscore=True)
        ),
        "small-adult-clahe": replace(
            _SMALL, preprocess=PreprocessConfig(lung_crop=True, clahe=True)
        ),
        "small-adult-acquisition": replace(_SMALL, augment="acquisition"),
        "small-adult-balanced": replace(_SMALL, sampling="balanced"),
        "small-adult-adversarial": replace(_SMALL, adversary=0.3),
        "small-adult-ensemble": replace(_SMALL, seeds=3, tta=True),
    }
)
DEFAULT_RECIPE = "lungs-adult"
#: The ship rule's sensitivity (ml.shiprule): the shipped threshold is chosen at it too.
TARGET_SENSITIVITY = 0.85


@dataclass
class TrainOptions:
    data: Path
    out: Path
    recipe: str = DEFAULT_RECIPE
    schedule: Schedule | None = None  # None: the recipe's
    batch_size: int = 32
    learning_rate: float = 3e-4
    val_fraction: float = 0.2
    stop_fraction: float = 0.15  # of the training patients, watched by early stopping
    seed: int = 42
    max_images: int = 0  # 0: all; else a patient-level random subset (for quick runs)
    max_pixels: int = DEFAULT_MAX_PIXELS
    segmenter: Path = DEFAULT_SEGMENTER_PATH
    cache_dir: Path | None = None  # preprocessed arrays; None: no cache
    hold_out_source: str = ""  # train without this source, validate on all of it
    n_boot: int = 1000
    progress: bool = True
    # `cxr cv`'s output folder for this recipe: calibration and threshold are then fitted on
    # its out-of-fold predictions of every training film, not on the early-stopping split
    cv_dir: Path | None = None


@dataclass
class Splits:
    records: list[Record]
    fit: list[Record]
    stop: list[Record]
    val: list[Record]


def weight_group(r: Record) -> str:
    if r.label == 1:
        return "covid"
    if r.source == NIH_SOURCE:
        return "nih-non-covid"
    if r.source in PEDIATRIC_SOURCES:
        return "pediatric-non-covid"
    return "same-source-non-covid"


def sample_weights(records: list[Record], group_shares: Mapping[str, float] | None) -> np.ndarray:
    """Per-image loss weights, normalised to mean 1: each group (``weight_group``) gets its
    share of the loss, renormalised over the groups present; None: the two labels half each."""
    if group_shares is None:
        keys = [str(r.label) for r in records]
        shares = dict.fromkeys(set(keys), 0.5)
    else:
        keys = [weight_group(r) for r in records]
        present = {k: v for k, v in group_shares.items() if k in keys}
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


def split(opts: TrainOptions, sources: tuple[str, ...] | None = None) -> Splits:
    """Validation, early-stopping and fit patients; no patient on two sides.  The validation
    patients are the same whatever ``sources`` the recipe trains on."""
    records = _subset(read_labels(opts.data / "manifest.csv"), opts.max_images, opts.seed)
    train_recs, val_recs = patient_split(records, opts.val_fraction, opts.seed)
    if sources is not None:
        train_recs = [r for r in train_recs if r.source in sources]
    if opts.hold_out_source:
        held = [r for r in records if r.source == opts.hold_out_source]
        if not held:
            raise ValueError(f"no films of source {opts.hold_out_source!r} to hold out")
        train_recs = [r for r in train_recs if r.source != opts.hold_out_source]
        val_recs = [r for r in val_recs if r.source != opts.hold_out_source] + held
    fit_recs, stop_recs = patient_split(train_recs, opts.stop_fraction, opts.seed + 1)
    groups = [{r.group for r in part} for part in (fit_recs, stop_recs, val_recs)]
    if groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2]:
        raise RuntimeError("a patient is on two sides of the split")
    return Splits(records, fit_recs, stop_recs, val_recs)


def load(
    opts: TrainOptions, config: PreprocessConfig, splits: Splits
) -> tuple[LoadedSet, LoadedSet, LoadedSet, LungSegmenter | None]:
    """The three splits through the one preprocessing path (segmenter and cache included)."""
    segmenter = LungSegmenter(opts.segmenter) if config.lung_crop else None
    if segmenter is not None:
        held = segmenter.metadata.get("validation", {})
        same = (held.get("seed", 42), held.get("val_fraction", 0.2)) == (
            opts.seed,
            opts.val_fraction,
        )
        if not same or opts.hold_out_source:
            log.warning(
                "the segmenter held out other patients than this split validates on: some "
                "validation films may be ones whose masks it trained on"
            )
    cache = None
    if opts.cache_dir is not None:
        cache = ArrayCache(
            opts.cache_dir, config, segmenter.decision_key if segmenter else "", opts.max_pixels
        )
    loaded = []
    for name, recs in (("fit", splits.fit), ("early-stopping", splits.stop), ("val", splits.val)):
        part = load_images(
            opts.data, recs, config, opts.max_pixels, opts.progress, segmenter, cache
        )
        log.info(
            "%s: %d films, %d skipped as not frontal, %d unreadable",
            name,
            len(part.records),
            len(part.skipped),
            len(part.unreadable),
        )
        loaded.append(part)
    return loaded[0], loaded[1], loaded[2], segmenter


def adult_monitor_weights(records: list[Record]) -> tuple[np.ndarray, np.ndarray]:
    """(mask of adult films, AUC sample weights): among adult non-COVID films, same-source and
    NIH films weigh half each, so the monitored AUC cannot be earned by telling NIH apart."""
    adult = np.array([r.source in ADULT_SOURCES for r in records], bool)
    w = np.ones(len(records))
    for group in ("same-source-non-covid", "nih-non-covid"):
        idx = [i for i, r in enumerate(records) if adult[i] and weight_group(r) == group]
        if idx:
            w[idx] = 0.5 / len(idx)
    pos = [i for i, r in enumerate(records) if adult[i] and r.label == 1]
    if pos:
        w[pos] = 1.0 / len(pos)
    return adult, w


def _monitor(stop_set: LoadedSet, progress: bool) -> Any:
    """A Keras callback that logs ``val_adult_auc`` on the early-stopping split each epoch."""
    import keras
    from sklearn.metrics import roc_auc_score

    adult, weights = adult_monitor_weights(stop_set.records)
    y = stop_set.y

    class AdultAUC(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            probs = np.asarray(self.model(stop_set.x, training=False)).reshape(-1)
            value = 0.5
            if len(set(y[adult].tolist())) == 2:
                value = roc_auc_score(y[adult], probs[adult], sample_weight=weights[adult])
            if logs is not None:
                logs["val_adult_auc"] = float(value)
            if progress:
                print(f"epoch {epoch + 1}: early-stopping adult AUC {fmt(value)}", flush=True)

    return AdultAUC()


def _targets(recipe: Recipe, records: list[Record]) -> np.ndarray:
    """(n, 1) labels, or (n, 2) [label, source index] for the adversarial recipes."""
    y = np.array([r.label for r in records], np.float32)[:, None]
    if not recipe.adversary:
        return y
    names = sorted({r.source for r in records})
    return np.c_[y, np.array([names.index(r.source) for r in records], np.float32)]


def _dataset(recipe: Recipe, fit_set: LoadedSet, batch_size: int, seed: int) -> Any:
    """Shuffled, augmented batches of (x, target, weight); reproducible for a seed."""
    import tensorflow as tf

    from ml.augment import acquisition, basic

    augment = basic(seed)
    records = fit_set.records
    target = _targets(recipe, records)
    if recipe.sampling == "balanced":
        # each (source, label) stratum drawn equally often; losses unweighted
        keys = sorted({(r.source, r.label) for r in records})
        parts = [
            tf.data.Dataset.from_tensor_slices(
                np.array([i for i, r in enumerate(records) if (r.source, r.label) == k], np.int64)
            )
            .shuffle(len(records), seed=seed + j, reshuffle_each_iteration=True)
            .repeat()
            for j, k in enumerate(keys)
        ]
        x_all, t_all = tf.constant(fit_set.x), tf.constant(target)
        ds = (
            tf.data.Dataset.sample_from_datasets(parts, [1.0 / len(keys)] * len(keys), seed=seed)
            .take(len(records))
            .map(lambda i: (tf.gather(x_all, i), tf.gather(t_all, i), tf.constant(1.0)))
        )
    else:
        weights = sample_weights(records, recipe.shares)
        ds = tf.data.Dataset.from_tensor_slices((fit_set.x, target, weights)).shuffle(
            len(records), seed=seed, reshuffle_each_iteration=True
        )
    ds = ds.batch(batch_size).enumerate()

    def jitter(step: Any, batch: Any) -> Any:
        x, t, w = batch
        x = tf.clip_by_value(augment(x, training=True), 0.0, 1.0)
        if recipe.augment == "acquisition":
            x = acquisition(x, tf.stack([tf.constant(seed, tf.int64), step]))
        return x, t, w

    return ds.map(jitter, num_parallel_calls=1, deterministic=True).prefetch(2)


def fit(
    opts: TrainOptions,
    recipe: Recipe,
    fit_set: LoadedSet,
    stop_set: LoadedSet,
    seed: int | None = None,
) -> tuple[Any, dict[str, list[float]], int]:
    """Train one network with early stopping on the recipe's :class:`Schedule`; the adult AUC
    of the early-stopping split is printed every epoch whatever it watches.  Returns the plain
    classifier of the recipe's architecture (an adversarial recipe's heads are dropped)."""
    import keras

    from shared.model_def import build

    seed = opts.seed if seed is None else seed
    plan = opts.schedule or recipe.schedule
    ds = _dataset(recipe, fit_set, opts.batch_size, seed)
    classifier = build(recipe.architecture, seed=seed)
    model = classifier
    if recipe.adversary:
        from ml.adversarial import SourceAdversarial

        n_sources = len({r.source for r in fit_set.records})
        model = SourceAdversarial(classifier, n_sources, recipe.adversary, seed=seed)
    model.compile(optimizer=keras.optimizers.Adam(opts.learning_rate), loss="binary_crossentropy")
    callbacks: list[Any] = []
    validation = None
    if len(stop_set.records):
        by_auc = plan.monitor == "adult_auc"
        if not by_auc:
            stop_w = sample_weights(stop_set.records, recipe.shares)
            # labels only: evaluation is the classifier's own loss, heads or not
            validation = (stop_set.x, stop_set.y.astype(np.float32)[:, None], stop_w)
        callbacks.append(_monitor(stop_set, opts.progress))
        callbacks.append(
            keras.callbacks.EarlyStopping(
                monitor="val_adult_auc" if by_auc else "val_loss",
                mode="max" if by_auc else "min",
                patience=plan.patience,
                start_from_epoch=plan.warmup_epochs,
                restore_best_weights=True,
            )
        )
    history = model.fit(
        ds,
        validation_data=validation,
        epochs=plan.epochs,
        callbacks=callbacks,
        shuffle=False,  # the dataset shuffles itself, reproducibly
        verbose=(1 if sys.stdout.isatty() else 2) if opts.progress else 0,
    )
    stopper = callbacks[-1] if callbacks else None
    ran = len(history.history["loss"])
    best = stopper.best_epoch + 1 if stopper is not None and stopper.best_weights else ran
    return classifier, history.history, best


#: Test-time variants (dx, dy, zoom) averaged by recipes with ``tta``: no flips.
TTA_VARIANTS = (
    (0.0, 0.0, 1.0),
    (0.03, 0.0, 1.0),
    (-0.03, 0.0, 1.0),
    (0.0, 0.03, 1.0),
    (0.0, 0.0, 0.94),
)


def _variant(x: np.ndarray, dx: float, dy: float, zoom: float) -> np.ndarray:
    """Films shifted by (dx, dy) of their size and scaled by ``zoom`` about the centre."""
    import cv2

    if (dx, dy, zoom) == (0.0, 0.0, 1.0):
        return x
    h, w = x.shape[1:3]
    m = np.array(
        [[zoom, 0, (1 - zoom) * w / 2 + dx * w], [0, zoom, (1 - zoom) * h / 2 + dy * h]],
        np.float64,
    )
    return np.stack([cv2.warpAffine(img, m, (w, h), borderMode=cv2.BORDER_CONSTANT) for img in x])


def predict_raw(models: list[Any], x: np.ndarray, tta: bool = False, batch: int = 64) -> np.ndarray:
    """The networks' mean sigmoid output (over the TTA variants too, where asked)."""
    if not len(x):
        return np.zeros(0, np.float32)
    variants = TTA_VARIANTS if tta else TTA_VARIANTS[:1]
    outs = []
    for model in models:
        for v in variants:
            xv = _variant(x, *v)
            outs.append(
                np.concatenate(
                    [
                        np.asarray(model(xv[i : i + batch], training=False)).reshape(-1)
                        for i in range(0, len(xv), batch)
                    ]
                )
            )
    return np.mean(outs, axis=0).astype(np.float32)


def _calibrate(stop_set: LoadedSet, raw: np.ndarray) -> tuple[dict[str, Any] | None, float]:
    adult = np.array([r.source in SAME_SOURCE_ADULT for r in stop_set.records], bool)
    y = stop_set.y
    if len(set(y.tolist())) < 2 or not y[adult].any():
        log.warning("early-stopping split lacks the films to calibrate; threshold stays 0.5")
        return None, 0.5
    return calibrate_and_choose(y, raw, adult, TARGET_SENSITIVITY, "early-stopping split")


def _calibrate_on_cv(
    opts: TrainOptions, recipe: Recipe, records: list[Record]
) -> tuple[dict[str, Any], float, dict[str, Any]]:
    """Platt scaling and the threshold from ``cxr cv``'s out-of-fold predictions of the films
    this recipe trains on (as scikit-learn's ``CalibratedClassifierCV(ensemble=False)`` fits its
    calibrator on ``cross_val_predict``): every film's raw score comes from a network that did
    not see its patient, so the calibration is not fitted on the network's own training films.
    Returns (calibration, threshold, the cross-validation summary for the metadata)."""
    import json

    from ml.cv import read_oof

    assert opts.cv_dir is not None
    oof = read_oof(opts.cv_dir / f"{opts.recipe}.oof.csv")
    report = json.loads((opts.cv_dir / f"{opts.recipe}.json").read_text())
    if report.get("fingerprint") != fingerprint(opts.data, records):
        raise ValueError(f"{opts.cv_dir} cross-validated other training data than {opts.data}")
    used = [r for r in records if r.file in oof]
    if recipe.sources is not None:
        used = [r for r in used if r.source in recipe.sources]
    y = np.array([r.label for r in used], int)
    raw = np.array([oof[r.file][1] for r in used], np.float64)
    adult = np.array([r.source in SAME_SOURCE_ADULT for r in used], bool)
    fitted_on = f"out-of-fold predictions of {len(used)} training films ({report['folds']}-fold cv)"
    calibration, threshold = calibrate_and_choose(y, raw, adult, TARGET_SENSITIVITY, fitted_on)
    summary = {k: report.get(k) for k in ("folds", "out_of_fold", "spread", "per_fold")}
    summary["recipe"] = opts.recipe
    return calibration, threshold, summary


def _segmenter_entry(opts: TrainOptions, segmenter: LungSegmenter | None) -> dict[str, Any] | None:
    """Copy the segmenter beside the model (a model folder is self-contained); name it."""
    if segmenter is None:
        return None
    src = Path(opts.segmenter)
    dst = Path(opts.out).parent / src.name
    if src.resolve() != dst.resolve():
        if dst.is_file() and sha256_file(dst) != segmenter.sha256:
            # another model beside it may name that file: never swap it underneath
            raise FileExistsError(f"{dst} is another segmenter; write the model elsewhere")
        shutil.copyfile(src, dst)
        shutil.copyfile(src.with_suffix(".json"), dst.with_suffix(".json"))
        scope_src, scope_dst = scope_net_path(src), scope_net_path(dst)
        if segmenter.scope_metadata is not None and scope_src.resolve() != scope_dst.resolve():
            # the scope net decides beside the segmenter: a model folder without it would
            # decide by the lung rule alone
            shutil.copyfile(scope_src, scope_dst)
            shutil.copyfile(scope_src.with_suffix(".json"), scope_dst.with_suffix(".json"))
    entry = {"file": src.name, "sha256": segmenter.sha256, "version": segmenter.version}
    if segmenter.scope_metadata is not None:
        entry["scope_net"] = {
            "file": scope_net_path(src).name,
            "sha256": segmenter.scope_metadata["sha256"],
            "version": segmenter.scope_metadata.get("version"),
        }
    return entry


def _split_metadata(opts: TrainOptions, splits: Splits, sets: list[LoadedSet]) -> dict[str, Any]:
    fit_set, stop_set, val_set = sets
    seen = {r.group for r in splits.fit} | {r.group for r in splits.stop}
    return {
        "method": "patient-level, stratified by (source, label)",
        "seed": opts.seed,
        "val_fraction": opts.val_fraction,
        "stop_fraction": opts.stop_fraction,
        "held_out_source": opts.hold_out_source or None,
        "train_sources": sorted({r.source for r in splits.fit + splits.stop}),
        "train_images": len(fit_set.records),
        "early_stopping_images": len(stop_set.records),
        "val_images": len(val_set.records),
        "skipped_images": {
            "fit": len(fit_set.skipped),
            "early_stopping": len(stop_set.skipped),
            "val": len(val_set.skipped),
        },
        "train_patients": len({r.group for r in splits.fit}),
        "val_patients": len({r.group for r in splits.val}),
        "val_patient_ids": sorted({r.group for r in splits.val}),
        # every patient the model saw (fit + early stopping): `cxr evaluate` refuses them
        "train_patient_ids": sorted(seen),
    }


def train(opts: TrainOptions) -> dict[str, Any]:
    """Split, load, fit, round to float16, calibrate, validate, write weights + metadata."""
    import keras
    import tensorflow as tf

    from shared.model_store import round_weights, save_weights, write_metadata

    if opts.recipe not in RECIPES:
        raise ValueError(f"unknown recipe {opts.recipe!r}; choose from {sorted(RECIPES)}")
    recipe = RECIPES[opts.recipe]
    if recipe.seeds > 1 or recipe.tta:
        raise ValueError(f"{opts.recipe} is an ensemble: `cxr cv` measures it; a service runs one")
    keras.utils.set_random_seed(opts.seed)
    tf.config.experimental.enable_op_determinism()
    splits = split(opts, recipe.sources)
    fit_set, stop_set, val_set, segmenter = load(opts, recipe.preprocess, splits)
    model, history, best_epoch = fit(opts, recipe, fit_set, stop_set)
    round_weights(model)
    sha = save_weights(model, opts.out)

    def raw(part: LoadedSet) -> np.ndarray:
        return np.asarray(model(part.x, training=False)).reshape(-1) if len(part.x) else np.zeros(0)

    cross_validation = None
    if opts.cv_dir is not None:
        calibration, threshold, cross_validation = _calibrate_on_cv(opts, recipe, splits.records)
    else:
        calibration, threshold = _calibrate(stop_set, raw(stop_set))
    probs = calibrate(raw(val_set), calibration)
    today = dt.datetime.now(dt.UTC)
    metadata = {
        "version": f"cxr-cnn-{opts.recipe}-{today:%Y%m%d}-{sha[:8]}",
        "sha256": sha,
        "architecture": recipe.architecture,
        "recipe": opts.recipe,
        "preprocess": recipe.preprocess.to_dict(),
        "segmenter": _segmenter_entry(opts, segmenter),
        "calibration": calibration,
        "threshold": threshold,
        "created_at": today.isoformat(timespec="seconds"),
        "training_data": {
            "manifest": str(opts.data / "manifest.csv"),
            "fingerprint": fingerprint(opts.data, splits.records),
            "images": len(splits.records),
        },
        "split": _split_metadata(opts, splits, [fit_set, stop_set, val_set]),
        "training": {
            "epochs_run": len(history["loss"]),
            "best_epoch": best_epoch,
            "schedule": asdict(opts.schedule or recipe.schedule),
            "batch_size": opts.batch_size,
            "learning_rate": opts.learning_rate,
            "loss_shares": dict(recipe.shares) if recipe.shares else "labels balanced",
            "max_images": opts.max_images,
            "history": {k: [round(float(v), 5) for v in vals] for k, vals in history.items()},
        },
        "validation": validation_report(
            val_set.records, probs, threshold, opts.n_boot, val_set.skipped
        )
        if len(val_set.records)
        else {},
    }
    if cross_validation is not None:
        metadata["cross_validation"] = cross_validation
    write_metadata(opts.out, metadata)
    return metadata


def summary_lines(metadata: dict[str, Any]) -> list[str]:
    """Human summary of a training run's validation metrics."""
    lines = [
        f"model {metadata['version']}  sha256 {metadata['sha256']}",
        f"threshold {metadata['threshold']} (calibrated probability)",
    ]
    if metadata.get("validation"):
        lines += ["  " + line for line in report_lines(metadata["validation"])]
    return lines
