"""``cxr cv``: recipes judged on out-of-fold predictions, with the ship rule and its spread.

Invariant: every prediction a recipe is judged on comes from a network that never saw that
film's patient.  The folds (:mod:`ml.folds`) cover every film once (children too: a fold's
children are scored by networks trained without them, whatever sources the recipe trains on);
inside each fold, early stopping and Platt calibration use an early-stopping split carved out
of the fold's *training* patients only, so the pooled out-of-fold probabilities are on one
calibrated scale and untouched by the held-out films.  The leave-one-source-out run
(``actualmed`` by default) trains without a whole source and scores all of it.  Every fold's
numbers are kept, so the report shows the spread across folds beside the pooled value and its
patient-bootstrap interval (:mod:`ml.shiprule`).

The per-film out-of-fold table (file, fold, raw and calibrated probability) is written next to
the report, outside the repository: it is derived from the data and is never committed.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ml.calibration import fit_platt
from ml.dataset import (
    ArrayCache,
    LoadedSet,
    Record,
    fingerprint,
    load_images,
    patient_split,
    read_labels,
)
from ml.folds import Fold, kfold, leave_source_out
from ml.metrics import fmt, metric_block
from ml.shiprule import RULE_KEYS, SHIP_SENSITIVITY, rule_point, rule_with_intervals, spread
from ml.train import RECIPES, Recipe, Schedule, TrainOptions, fit, predict_raw
from shared.imaging import DEFAULT_MAX_PIXELS
from shared.lungs import DEFAULT_SEGMENTER_PATH, LungSegmenter
from shared.model_store import calibrate

log = logging.getLogger(__name__)


@dataclass
class CVOptions:
    data: Path
    out: Path
    recipes: list[str]
    folds: int = 5
    seed: int = 42
    hold_out_source: str = "actualmed"  # "" for none
    stop_fraction: float = 0.15
    batch_size: int = 32
    learning_rate: float = 3e-4
    schedule: Schedule | None = None  # None: each recipe's
    max_images: int = 0
    max_pixels: int = DEFAULT_MAX_PIXELS
    segmenter: Path = DEFAULT_SEGMENTER_PATH
    cache_dir: Path | None = None
    n_boot: int = 1000
    progress: bool = True
    only_folds: list[int] = field(default_factory=list)  # quick runs: these folds only
    hold_out_only: bool = False  # only the leave-one-source-out run


def _subset(loaded: LoadedSet, index: dict[str, int], records: list[Record]) -> LoadedSet:
    rows = [index[r.file] for r in records if r.file in index]
    kept = [r for r in records if r.file in index]
    x = loaded.x[rows] if rows else np.zeros((0, *loaded.x.shape[1:]), np.float32)
    return LoadedSet(kept, x)


class _Clock:
    """Progress with an estimate of the time left, from the mean time of the folds done."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.done, self.start, self.enabled = total, 0, time.monotonic(), enabled

    def tick(self, what: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        spent = time.monotonic() - self.start
        left = spent / self.done * (self.total - self.done)
        print(
            f"[cv] {self.done}/{self.total} {what} done; {spent / 60:.1f} min so far, "
            f"about {left / 60:.1f} min left",
            flush=True,
        )


def _train_fold(
    opts: CVOptions,
    recipe: Recipe,
    fold: Fold,
    records: list[Record],
    loaded: LoadedSet,
    index: dict[str, int],
) -> dict[str, Any]:
    """Train the recipe on a fold's training patients; score its held-out films (``fold``
    indexes ``records``; films the preprocessing skipped are in no set)."""
    import keras
    import tensorflow as tf

    train_recs = [records[i] for i in fold.train]
    if recipe.sources is not None:
        train_recs = [r for r in train_recs if r.source in recipe.sources]
    fit_recs, stop_recs = patient_split(train_recs, opts.stop_fraction, opts.seed + 1)
    fit_set = _subset(loaded, index, fit_recs)
    stop_set = _subset(loaded, index, stop_recs)
    test_set = _subset(loaded, index, [records[i] for i in fold.test])
    topts = TrainOptions(
        data=opts.data,
        out=opts.out,
        schedule=opts.schedule,
        batch_size=opts.batch_size,
        learning_rate=opts.learning_rate,
        seed=opts.seed,
        progress=False,
    )
    models, epochs = [], []
    for k in range(recipe.seeds):
        keras.utils.set_random_seed(opts.seed + k)
        tf.config.experimental.enable_op_determinism()
        model, history, best = fit(topts, recipe, fit_set, stop_set, seed=opts.seed + k)
        models.append(model)
        epochs.append({"ran": len(history["loss"]), "best": best})
    raw_stop = predict_raw(models, stop_set.x, recipe.tta)
    raw_test = predict_raw(models, test_set.x, recipe.tta)
    calibration = fit_platt(stop_set.y, raw_stop, f"{fold.name} early-stopping split")
    return {
        "fold": fold.name,
        "files": [r.file for r in test_set.records],
        "raw": raw_test,
        "p": calibrate(raw_test, calibration),
        "calibration": calibration,
        "epochs": epochs,
        "train_films": len(fit_set.records),
        "stop_films": len(stop_set.records),
    }


def _rule_of(records: list[Record], p: np.ndarray, n_boot: int) -> dict[str, Any]:
    return rule_with_intervals(
        [r.label for r in records],
        p,
        [r.source for r in records],
        [r.group for r in records],
        n_boot=n_boot,
    )


def run_recipe(
    opts: CVOptions,
    name: str,
    records: list[Record],
    loaded: LoadedSet,
    folds: list[Fold],
    clock: _Clock,
) -> dict[str, Any]:
    recipe = RECIPES[name]
    index = {r.file: i for i, r in enumerate(loaded.records)}
    by_file = {r.file: r for r in loaded.records}
    results = []
    for fold in folds:
        result = _train_fold(opts, recipe, fold, records, loaded, index)
        results.append(result)
        point = rule_point(
            [by_file[f].label for f in result["files"]],
            result["p"],
            [by_file[f].source for f in result["files"]],
        )
        result["rule"] = point
        clock.tick(f"{name} {fold.name} (rule {fmt(point['score'])})")
    kfolds = [r for r in results if r["fold"].startswith("fold")]
    report: dict[str, Any] = {"recipe": name, "sensitivity_target": SHIP_SENSITIVITY}
    if kfolds:
        files = [f for r in kfolds for f in r["files"]]
        recs = [by_file[f] for f in files]
        p = np.concatenate([r["p"] for r in kfolds])
        report["out_of_fold"] = _rule_of(recs, p, opts.n_boot)
        report["out_of_fold"]["n"] = len(recs)
        report["per_fold"] = [
            {
                "fold": r["fold"],
                **{k: r["rule"].get(k) for k in ("threshold", *RULE_KEYS)},
                "epochs": r["epochs"],
                "train_films": r["train_films"],
            }
            for r in kfolds
        ]
        report["spread"] = {k: spread(report["per_fold"], k) for k in RULE_KEYS}
        _write_oof(opts.out / f"{name}.oof.csv", kfolds)
    threshold = (report.get("out_of_fold") or {}).get("threshold", {}).get("value")
    for r in results:
        if not r["fold"].startswith("fold"):
            # a whole source never seen: AUC, and sensitivity/specificity at the out-of-fold
            # threshold (0.5 where there is none), with patient-bootstrap intervals
            recs = [by_file[f] for f in r["files"]]
            block = metric_block(
                np.array([x.label for x in recs]),
                r["p"],
                [x.group for x in recs],
                0.5 if threshold is None else threshold,
                opts.n_boot,
            )
            block["epochs"] = r["epochs"]
            report[r["fold"]] = block
    return report


def _write_oof(path: Path, results: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "fold", "raw", "probability"])
        for r in results:
            for f, raw, p in zip(r["files"], r["raw"], r["p"], strict=True):
                w.writerow([f, r["fold"], f"{raw:.6f}", f"{p:.6f}"])


def read_oof(path: Path) -> dict[str, tuple[str, float, float]]:
    """file -> (fold, raw, calibrated probability), as :func:`run_recipe` wrote them."""
    with open(path, newline="") as fh:
        return {
            row["file"]: (row["fold"], float(row["raw"]), float(row["probability"]))
            for row in csv.DictReader(fh)
        }


def load_all(opts: CVOptions) -> tuple[list[Record], LoadedSet, dict[str, LoadedSet]]:
    """Every film through the one preprocessing path, once per preprocessing config."""
    records = read_labels(opts.data / "manifest.csv")
    if opts.max_images and opts.max_images < len(records):
        _, records = patient_split(records, opts.max_images / len(records), opts.seed + 1)
    segmenter = LungSegmenter(opts.segmenter)
    per_config: dict[str, LoadedSet] = {}
    for name in opts.recipes:
        config = RECIPES[name].preprocess
        key = json.dumps(config.to_dict(), sort_keys=True)
        if key in per_config:
            continue
        cache = None
        if opts.cache_dir is not None:
            cache = ArrayCache(opts.cache_dir, config, segmenter.decision_key, opts.max_pixels)
        per_config[key] = load_images(
            opts.data, records, config, opts.max_pixels, opts.progress, segmenter, cache
        )
    any_set = next(iter(per_config.values()))
    return records, any_set, per_config


def run_cv(opts: CVOptions) -> dict[str, Any]:
    for name in opts.recipes:
        if name not in RECIPES:
            raise ValueError(f"unknown recipe {name!r}; choose from {sorted(RECIPES)}")
    records, _, per_config = load_all(opts)
    folds = kfold(records, opts.folds, opts.seed)
    if opts.only_folds:
        folds = [folds[i - 1] for i in opts.only_folds]
    if opts.hold_out_only:
        folds = []
    if opts.hold_out_source:
        folds.append(leave_source_out(records, opts.hold_out_source))
    clock = _Clock(len(folds) * len(opts.recipes), True)  # a sweep runs for hours: always say
    report: dict[str, Any] = {
        "folds": opts.folds,
        "seed": opts.seed,
        "method": "StratifiedGroupKFold by patient, strata source|label; "
        "early stopping and calibration inside each fold's training patients",
        "training_data": {
            "manifest": str(opts.data / "manifest.csv"),
            "fingerprint": fingerprint(opts.data, records),
            "images": len(records),
        },
        "recipes": {},
    }
    opts.out.mkdir(parents=True, exist_ok=True)
    for name in opts.recipes:
        key = json.dumps(RECIPES[name].preprocess.to_dict(), sort_keys=True)
        loaded = per_config[key]
        started = time.monotonic()
        result = run_recipe(opts, name, records, loaded, folds, clock)
        result["minutes"] = round((time.monotonic() - started) / 60, 1)
        result["skipped"] = len(loaded.skipped)
        result["folds"] = opts.folds
        result["fingerprint"] = report["training_data"]["fingerprint"]
        report["recipes"][name] = result
        (opts.out / f"{name}.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
        for line in recipe_lines(result):
            print(line, flush=True)
    (opts.out / "cv-report.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    return report


def _ci(block: dict[str, Any]) -> str:
    ci = block.get("ci95")
    tail = f" [{fmt(ci[0])}, {fmt(ci[1])}]" if ci else ""
    return f"{fmt(block.get('value'))}{tail}"


def recipe_lines(result: dict[str, Any]) -> list[str]:
    """A recipe's out-of-fold rule, its parts with intervals, the fold spread, the leave-out."""
    lines = [f"recipe {result['recipe']}"]
    oof = result.get("out_of_fold")
    if oof:
        lines.append(
            f"  out of fold (n={oof['n']}), threshold at same-source adult sensitivity "
            f"{oof['sensitivity_target']}: {_ci(oof['threshold'])}"
        )
        for key in RULE_KEYS:
            s = result["spread"][key]
            lines.append(
                f"    {key:26s} {_ci(oof[key]):28s} folds mean {fmt(s['mean'])} "
                f"sd {fmt(s['sd'])} range {fmt(s['min'])}-{fmt(s['max'])}"
            )
    for key, block in result.items():
        if key.startswith("without-"):
            lines.append(
                f"  {key} (n={block['n']}): AUC {_ci(block['auc'])}, sensitivity "
                f"{_ci(block['sensitivity'])}, specificity {_ci(block['specificity'])}"
            )
    return lines


def compare(data: Path, base: Path, other: Path, n_boot: int = 1000) -> dict[str, Any]:
    """Paired difference (``other - base``) of two ``cxr cv`` out-of-fold tables on the films
    both scored (:func:`ml.shiprule.paired_difference`)."""
    from ml.shiprule import paired_difference

    a, b = read_oof(base), read_oof(other)
    recs = [r for r in read_labels(data / "manifest.csv") if r.file in a and r.file in b]
    return paired_difference(
        [r.label for r in recs],
        [a[r.file][2] for r in recs],
        [b[r.file][2] for r in recs],
        [r.source for r in recs],
        [r.group for r in recs],
        n_boot=n_boot,
    ) | {"n": len(recs)}
