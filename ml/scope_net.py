"""``cxr train-scope``: the scope net (frontal chest film? a child's?) and its decision rule.

Invariant: no film grades the net that learnt from it.  Every scope net is fitted on part of
its patients and its thresholds are chosen on the others (the *threshold split*, patients held
out of fitting); the out-of-fold audit (:func:`audit_folds`, ``cxr audit-scope --folds 5``)
trains one net per fold of patients (scikit-learn ``StratifiedGroupKFold``: groups are
patients, strata the source or the kind) and decides each film only with the net of the fold
that left its patient out, so what it reports was never seen by the net that decided it.

What it learns from (all through the bundled segmenter, exactly as the workers see a film:
:func:`shared.lungs.seg_input` and the U-Net's mask):

* the frontal films of ``../shared/data/cxr``: frontal 1; child 1 for ``kermany`` (the only
  pediatric source), 0 for the adult sources;
* the same films with generated intensive-care overlays (:func:`ml.synthetic.icu_overlay`:
  tubes, lines, electrodes, a pacemaker, one lung whited out, rotated and magnified supine
  projections), frontal 1, child as the film's; made in memory, never written anywhere;
* the lateral films and CT slices of ``../shared/data/cxr-scope``: frontal 0, no child loss;
* generated non-chest images of the segmenter's training kinds (:data:`ml.segment.TRAIN_KINDS`)
  from seed :data:`GENERATED_SEED0`; the audit's generated images use seeds 0..19 and two
  kinds no network ever trains on;
* generated frontal films (:func:`ml.synthetic.chest_film`, seeds from
  :data:`CHEST_SEED0`, half of them with overlays): frontal 1, child 0.  They stand in for
  adults' films in the tests and benchmarks; a drawn chest has the proportions of neither, and
  a net that never saw one called it a child's.  The audit's use seeds 0..39.

TensorFlow's op determinism is on and every seed is fixed: the same data gives the same file.
"""

from __future__ import annotations

import csv
import datetime as dt
import logging
import sys
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ml.segment import TRAIN_KINDS
from ml.synthetic import ICU_DEVICES, ICU_KINDS, KINDS, chest_film, generate, icu_overlay
from shared.imaging import ImageError, decode_grayscale
from shared.lungs import (
    CROP_MARGIN,
    RULES,
    SCOPE_POOL,
    SEG_SIZE,
    Box,
    LungFinding,
    LungSegmenter,
    ScopeRule,
    build_scope_net,
    decide,
    find_lungs,
    seg_input,
)

PEDIATRIC_SOURCES = ("kermany",)
#: Overlay scenarios, one per film in turn (film i gets scenario i % 4, seed OVERLAY_SEED0 + i).
SCENARIOS: dict[str, tuple[str, ...]] = {
    "devices": ICU_DEVICES,
    "whiteout": ("whiteout", "ett", "cvc", "ecg"),
    "position": ("position", "ett", "ng", "ecg"),
    "all": ICU_KINDS,
}
OVERLAY_SEED0 = 50_000
GENERATED_SEED0 = 20_000  # fitting (the segmenter's are 10,000 on, the audit's 0..19)
THRESHOLD_SEED0 = 30_000  # generated images of the threshold split
GENERATED_PER_KIND = 40
CHEST_SEED0 = 40_000  # generated frontal films for fitting; the audit's are seeds 0..39
CHEST_FILMS = 160
CHEST_THRESHOLD_SEED0 = 50_000
THRESHOLD_CHEST_FILMS = 40
AUDIT_CHEST_FILMS = 40
THRESHOLD_GENERATED_PER_KIND = 10
AUDIT_GENERATED_PER_KIND = 20
THRESHOLD_FRACTION = 0.2  # of a net's patients, held out of fitting to choose its thresholds
# The decision's targets are 1% (frontal films skipped, adult films refused as pediatric);
# the thresholds aim at half of that on the threshold split, which is small.
FRONTAL_SKIP_AIM = 0.005
ADULT_AS_CHILD_AIM = 0.005
MAX_FRONTAL_SKIPPED = 0.01
MAX_OUT_OF_SCOPE_SCORED = 0.10
MAX_ADULT_AS_CHILD = 0.01
MIN_CHILDREN_SKIPPED = 0.95
THRESHOLD_CAP = 0.5  # never ask more of a sigmoid than its middle (a looser one is chosen)
# real out-of-scope films are few: repeated (augmented differently each time) to this share of
# the frontal positives, the generated ones to this share
REAL_NEGATIVE_SHARE = 0.25
GENERATED_SHARE = 0.15
# an adult refused as a child costs more than a child scored (a 1% limit against a 95% aim)
ADULT_CHILD_WEIGHT = 2.0
UNAUGMENTED_SHARE = 0.5  # of each batch: the films exactly as the workers' net will see them

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Item:
    """One input of the scope net: a film, a film with an overlay, or a generated image."""

    file: str
    group: str  # patient; generated images: their own name
    # frontal | overlay | lateral | ct: real films (and overlays on them); generated[_threshold]
    # and generated_chest[_threshold]: generated images for fitting and for the threshold
    # split; audit_generated and audit_generated_chest: generated images the audit grades
    kind: str
    source: str = ""
    view: str = ""
    scenario: str = ""
    frontal: int = 1
    child: int | None = None  # None: no child loss


@dataclass
class Prepared:
    """The segmenter's input and mask for every item, and the lung rule's verdict on it."""

    items: list[Item]
    seg: np.ndarray  # (n, SEG_SIZE, SEG_SIZE) uint8: seg_input * 255, exact
    masks: np.ndarray  # (n, SEG_SIZE, SEG_SIZE) float32: the U-Net's probabilities
    lung_boxes: list[Box | None] = field(default_factory=list)  # find_lungs, no margin

    def inputs(self, idx: np.ndarray) -> np.ndarray:
        """The scope net's (len(idx), SEG_SIZE, SEG_SIZE, 2) float32 input."""
        return np.stack(
            [self.seg[idx].astype(np.float32) / 255.0, self.masks[idx]], axis=-1
        ).astype(np.float32)

    def pooled(self, idx: np.ndarray) -> np.ndarray:
        """:meth:`inputs` averaged over SCOPE_POOL squares, as the net's first layer does."""
        x = self.inputs(idx)
        n, s, p = len(x), SEG_SIZE // SCOPE_POOL, SCOPE_POOL
        return x.reshape(n, s, p, s, p, 2).mean(axis=(2, 4)).astype(np.float32)

    def where(self, pred: Callable[[Item], bool]) -> np.ndarray:
        return np.array([i for i, it in enumerate(self.items) if pred(it)], np.int64)


@dataclass
class ScopeOptions:
    data: Path  # frontal films with manifest.csv (file, source, patient, view)
    scope: Path | None  # lateral / CT films with manifest.csv (file, kind, patient)
    segmenter: Path
    out: Path
    epochs: int = 30
    batch_size: int = 64
    learning_rate: float = 2e-3
    seed: int = 42
    progress: bool = True


def _manifest(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _film_items(opts: ScopeOptions) -> list[tuple[Item, Path]]:
    out: list[tuple[Item, Path]] = []
    for row in _manifest(opts.data / "manifest.csv"):
        source = row.get("source", "")
        out.append(
            (
                Item(
                    file=row["file"],
                    group=row.get("patient") or f"file:{row['file']}",
                    kind="frontal",
                    source=source,
                    view=row.get("view", ""),
                    frontal=1,
                    child=int(source in PEDIATRIC_SOURCES),
                ),
                opts.data / row["file"],
            )
        )
    if opts.scope is not None:
        for row in _manifest(opts.scope / "manifest.csv"):
            out.append(
                (
                    Item(
                        file=row["file"],
                        group=row.get("patient") or f"file:{row['file']}",
                        kind=row["kind"],
                        source=row["kind"],
                        frontal=0,
                        child=None,
                    ),
                    opts.scope / row["file"],
                )
            )
    return out


def _generated_items() -> list[tuple[Item, np.ndarray]]:
    out = []
    sets = (
        ("generated", TRAIN_KINDS, GENERATED_SEED0, GENERATED_PER_KIND),
        ("generated_threshold", TRAIN_KINDS, THRESHOLD_SEED0, THRESHOLD_GENERATED_PER_KIND),
        ("audit_generated", KINDS, 0, AUDIT_GENERATED_PER_KIND),
    )
    for kind, kinds, seed0, n in sets:
        for k in kinds:
            for seed in range(seed0, seed0 + n):
                name = f"{k}:{seed}"
                out.append((Item(name, name, kind, source=k, frontal=0), generate(k, seed)))
    names = list(SCENARIOS)
    sets2 = (
        ("generated_chest", CHEST_SEED0, CHEST_FILMS),
        ("generated_chest_threshold", CHEST_THRESHOLD_SEED0, THRESHOLD_CHEST_FILMS),
        ("audit_generated_chest", 0, AUDIT_CHEST_FILMS),
    )
    for kind, seed0, n in sets2:
        for seed in range(seed0, seed0 + n):
            rng = np.random.default_rng(seed)
            h, w = int(rng.integers(200, 520)), int(rng.integers(200, 460))
            film = chest_film(seed, h, w)
            scenario = names[seed % len(names)] if seed % 2 else ""
            if scenario:  # the drawn lungs' place is not known here: the default ellipses
                film = icu_overlay(film, OVERLAY_SEED0 + seed, SCENARIOS[scenario])
            name = f"chest:{seed}"
            out.append(
                (Item(name, name, kind, "generated", scenario=scenario, frontal=1, child=0), film)
            )
    return out


def prepare(opts: ScopeOptions, segmenter: LungSegmenter | None = None) -> Prepared:
    """Decode every film, make its overlay, and run the segmenter on all of them (batched)."""
    seg_model = segmenter or LungSegmenter(opts.segmenter, scope_net=False)
    films = _film_items(opts)
    t0 = time.monotonic()

    def decode(path: Path) -> np.ndarray | None:
        try:
            return decode_grayscale(path.read_bytes())
        except (OSError, ImageError):
            return None  # unreadable is not a scope question

    with ThreadPoolExecutor(2) as pool:
        grays = list(pool.map(decode, [p for _, p in films]))
    kept = [(it, g) for (it, _), g in zip(films, grays, strict=True) if g is not None]
    items = [it for it, _ in kept]
    seg = np.stack([seg_input(g) for _, g in kept])
    masks = _masks(seg_model, seg)
    log.info("scope net: %d films segmented in %.0f s", len(items), time.monotonic() - t0)

    # overlays on the frontal films, drawn in the place of each film's own lungs
    frontal = [i for i, it in enumerate(items) if it.kind == "frontal"]
    names = list(SCENARIOS)

    def overlay(pos: int) -> np.ndarray:
        i = frontal[pos]
        g8 = np.clip(kept[i][1] * 255.0 + 0.5, 0, 255).astype(np.uint8)
        scenario = SCENARIOS[names[pos % len(names)]]
        return seg_input(icu_overlay(g8, OVERLAY_SEED0 + pos, scenario, masks[i]) / 255.0)

    with ThreadPoolExecutor(2) as pool:
        over = np.stack(list(pool.map(overlay, range(len(frontal)))))
    over_items = [
        Item(
            items[i].file,
            items[i].group,
            "overlay",
            items[i].source,
            items[i].view,
            names[pos % len(names)],
            1,
            items[i].child,
        )
        for pos, i in enumerate(frontal)
    ]
    generated = _generated_items()
    gen = np.stack([seg_input(img.astype(np.float32) / 255.0) for _, img in generated])
    all_seg = np.concatenate([seg, over, gen])
    all_masks = np.concatenate([masks, _masks(seg_model, over), _masks(seg_model, gen)])
    all_items = items + over_items + [it for it, _ in generated]
    log.info("scope net: %d inputs prepared in %.0f s", len(all_items), time.monotonic() - t0)
    return Prepared(
        all_items,
        np.clip(all_seg * 255.0 + 0.5, 0, 255).astype(np.uint8),
        all_masks,
        [find_lungs(m, margin=0.0).box for m in all_masks],
    )


def _masks(segmenter: LungSegmenter, seg: np.ndarray, batch: int = 64) -> np.ndarray:
    # the segmenter sees exactly what seg_input gives, rounded as prepare stores it
    seg = np.clip(seg * 255.0 + 0.5, 0, 255).astype(np.uint8).astype(np.float32) / 255.0
    return np.concatenate(
        [segmenter.masks(seg[i : i + batch]) for i in range(0, len(seg), batch)]
    ).astype(np.float32)


# ------------------------------------------------------------------------------ folds


def patient_folds(prep: Prepared, n_folds: int, seed: int) -> np.ndarray:
    """A fold per item: real films by patient (StratifiedGroupKFold, strata source or kind),
    an overlay in its film's fold, generated audit images spread evenly, the rest -1."""
    from sklearn.model_selection import StratifiedGroupKFold

    films = prep.where(lambda it: it.kind in ("frontal", "lateral", "ct"))
    groups = [prep.items[i].group for i in films]
    strata = [prep.items[i].source for i in films]
    fold = np.full(len(prep.items), -1, np.int64)
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    by_group: dict[str, int] = {}
    for k, (_, held) in enumerate(splitter.split(np.zeros(len(films)), strata, groups)):
        fold[films[held]] = k
        for i in films[held]:
            by_group[prep.items[i].group] = k
    audit_seen = 0
    for i, it in enumerate(prep.items):
        if it.kind == "overlay":
            fold[i] = by_group[it.group]
        elif it.kind in ("audit_generated", "audit_generated_chest"):
            fold[i] = audit_seen % n_folds
            audit_seen += 1
    return fold


def threshold_split(prep: Prepared, idx: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Of the real items ``idx`` (films and their overlays): (fitting, threshold) by patient,
    the threshold split about THRESHOLD_FRACTION of them."""
    from sklearn.model_selection import StratifiedGroupKFold

    films = np.array([i for i in idx if prep.items[i].kind in ("frontal", "lateral", "ct")])
    groups = [prep.items[i].group for i in films]
    strata = [prep.items[i].source for i in films]
    n_splits = round(1 / THRESHOLD_FRACTION)
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    _, held = next(splitter.split(np.zeros(len(films)), strata, groups))
    held_groups = {prep.items[i].group for i in films[held]}
    thr = np.array([i for i in idx if prep.items[i].group in held_groups], np.int64)
    fit = np.array([i for i in idx if prep.items[i].group not in held_groups], np.int64)
    return fit, thr


# --------------------------------------------------------------------------- training


def _loss(y_true: Any, y_pred: Any) -> Any:
    """Binary cross-entropy of both outputs, each weighted (0: no loss, as for the child
    output of a lateral film)."""
    import tensorflow as tf

    y, w = y_true[:, :2], y_true[:, 2:]
    p = tf.clip_by_value(y_pred, 1e-6, 1 - 1e-6)
    bce = -(y * tf.math.log(p) + (1 - y) * tf.math.log(1 - p))
    return tf.reduce_mean(tf.reduce_sum(bce * w, axis=1))


def _targets(items: list[Item]) -> np.ndarray:
    out = np.zeros((len(items), 4), np.float32)
    for j, it in enumerate(items):
        child_weight = 0.0 if it.child is None else (1.0 if it.child else ADULT_CHILD_WEIGHT)
        out[j] = (it.frontal, it.child or 0, 1.0, child_weight)
    return out


def _fit_indices(prep: Prepared, fit: np.ndarray) -> np.ndarray:
    """The fitting items, out-of-scope ones repeated to their share of the frontal ones."""
    generated = prep.where(lambda it: it.kind == "generated")
    chests = prep.where(lambda it: it.kind == "generated_chest")
    pos = np.concatenate(
        [np.array([i for i in fit if prep.items[i].frontal == 1], np.int64), chests]
    )
    neg = np.array([i for i in fit if prep.items[i].frontal == 0], np.int64)
    parts = [pos]
    for share, pool in ((REAL_NEGATIVE_SHARE, neg), (GENERATED_SHARE, generated)):
        if len(pool):
            reps = max(1, round(share * len(pos) / len(pool)))
            parts.append(np.tile(pool, reps))
    return np.concatenate(parts)


def _dataset(x: np.ndarray, y: np.ndarray, opts: ScopeOptions) -> Any:
    import keras
    import tensorflow as tf

    geometric = keras.Sequential(
        [
            # a mirrored film is as frontal, and as much a child's, as the film
            keras.layers.RandomFlip("horizontal", seed=opts.seed),
            keras.layers.RandomRotation(0.03, fill_mode="constant", seed=opts.seed),
            keras.layers.RandomZoom((-0.12, 0.12), fill_mode="constant", seed=opts.seed),
            keras.layers.RandomTranslation(0.06, 0.06, fill_mode="constant", seed=opts.seed),
        ]
    )
    rng = tf.random.Generator.from_seed(opts.seed)

    def augment(xb: Any, yb: Any) -> Any:
        # interpolation smooths what it moves: without untouched films in every batch, the
        # net learnt "noise" only as smoothed noise and took a raw noise frame for a film
        keep = rng.uniform((tf.shape(xb)[0], 1, 1, 1)) < UNAUGMENTED_SHARE
        return tf.where(keep, xb, geometric(xb, training=True)), yb

    return (
        tf.data.Dataset.from_tensor_slices((x, y))
        .shuffle(len(x), seed=opts.seed, reshuffle_each_iteration=True)
        .batch(opts.batch_size)
        .map(augment, num_parallel_calls=1, deterministic=True)
        .prefetch(2)
    )


def fit_net(prep: Prepared, fit: np.ndarray, opts: ScopeOptions) -> tuple[Any, list[float]]:
    """A scope net fitted on the items ``fit`` (weights rounded to float16, as stored)."""
    import keras
    import tensorflow as tf

    from shared.model_store import round_weights

    keras.utils.set_random_seed(opts.seed)
    tf.config.experimental.enable_op_determinism()
    order = _fit_indices(prep, fit)
    # trained on inputs pooled beforehand, so that augmentation works on the small images
    x = prep.pooled(order)
    y = _targets([prep.items[i] for i in order])
    model = build_scope_net(seed=opts.seed, pooled_input=True)
    model.compile(optimizer=keras.optimizers.Adam(opts.learning_rate), loss=_loss)
    schedule = keras.callbacks.LearningRateScheduler(
        lambda epoch: opts.learning_rate * 0.5 * (1 + np.cos(np.pi * epoch / opts.epochs))
    )
    history = model.fit(
        _dataset(x, y, opts),
        epochs=opts.epochs,
        callbacks=[schedule],
        verbose=(1 if sys.stdout.isatty() else 2) if opts.progress else 0,
    )
    round_weights(model)
    full = build_scope_net()
    full.set_weights(model.get_weights())
    return full, [round(float(v), 5) for v in history.history["loss"]]


def scores(model: Any, prep: Prepared, idx: np.ndarray, batch: int = 256) -> np.ndarray:
    """The net's (len(idx), 2) outputs, in inference mode."""
    if len(idx) == 0:
        return np.zeros((0, 2), np.float32)
    return np.concatenate(
        [
            np.asarray(model(prep.inputs(idx[i : i + batch]), training=False))
            for i in range(0, len(idx), batch)
        ]
    )


# ------------------------------------------------------------------------- the rule


def _skipped(lung_ok: np.ndarray, frontal: np.ndarray, t: float, combine: str) -> np.ndarray:
    by_net = frontal >= t
    return ~(lung_ok | by_net) if combine == "lungs_or_net" else ~by_net


def choose_rule(
    prep: Prepared, thr: np.ndarray, out: np.ndarray, default_box: Box
) -> tuple[ScopeRule, dict[str, Any]]:
    """Thresholds and combination, from the threshold split's items ``thr`` and the net's
    outputs on them ``out`` (never the fitting items).

    Frontal: for each combination, the highest threshold (at most THRESHOLD_CAP) at which at
    most FRONTAL_SKIP_AIM of the frontal films, and of the overlaid ones, are skipped; the
    combination kept is the one that scores fewer out-of-scope images there, then skips fewer
    frontal films, then the first of RULES.  Child: the lowest threshold (at least
    THRESHOLD_CAP) at which at most ADULT_AS_CHILD_AIM of the adult frontal films are refused.
    """
    items = [prep.items[i] for i in thr]
    lung_ok = np.array([prep.lung_boxes[i] is not None for i in thr])
    kinds = np.array([it.kind for it in items])
    real = kinds == "frontal"
    over = kinds == "overlay"
    drawn = kinds == "generated_chest_threshold"
    oos = np.array([it.frontal == 0 for it in items])
    grid = np.concatenate([np.linspace(0.01, 0.99, 99), [0.995, 0.999]])
    candidates = []
    for combine in RULES:
        ok = [
            t
            for t in grid
            if all(
                _skipped(lung_ok[m], out[m, 0], t, combine).mean() <= FRONTAL_SKIP_AIM
                for m in (real, over, drawn)
                if m.any()
            )
        ]
        t = min(THRESHOLD_CAP, max(ok)) if ok else float(grid[0])
        skip = _skipped(lung_ok, out[:, 0], t, combine)
        front = real | over
        fact = {
            "combine": combine,
            "frontal_threshold": round(float(t), 4),
            "meets_aim": bool(ok),
            "frontal_skipped": round(float(skip[front].mean()), 4) if front.any() else None,
            "out_of_scope_scored": round(float((~skip[oos]).mean()), 4) if oos.any() else None,
        }
        candidates.append(
            (
                not fact["meets_aim"],
                fact["out_of_scope_scored"] or 0.0,
                fact["frontal_skipped"] or 0.0,
                RULES.index(combine),
                fact,
            )
        )
    best = min(candidates, key=lambda c: c[:4])[4]
    adult = (real | over | drawn) & np.array([it.child == 0 for it in items])
    adult_child = out[adult, 1]
    child_t = next(
        (
            float(t)
            for t in grid
            if t >= THRESHOLD_CAP and (adult_child >= t).mean() <= ADULT_AS_CHILD_AIM
        ),
        float(grid[-1]),
    )
    rule = ScopeRule(best["frontal_threshold"], round(child_t, 4), best["combine"], default_box)
    children = (real | over) & np.array([it.child == 1 for it in items])
    facts = {
        "items": dict(Counter(kinds.tolist())),
        "candidates": [c[4] for c in candidates],
        "adult_refused_as_child": round(float((adult_child >= child_t).mean()), 4)
        if adult.any()
        else None,
        "children_refused": round(float((out[children, 1] >= child_t).mean()), 4)
        if children.any()
        else None,
    }
    return rule, facts


def default_box(prep: Prepared, idx: np.ndarray) -> Box:
    """The median lung box (no margin) of the frontal films in ``idx`` the lung rule accepts."""
    boxes = [
        prep.lung_boxes[i]
        for i in idx
        if prep.items[i].kind == "frontal" and prep.lung_boxes[i] is not None
    ]
    med = np.median([[b.x0, b.y0, b.x1, b.y1] for b in boxes], axis=0)
    return Box(*(round(float(v), 4) for v in med))


def train_rule(
    prep: Prepared, idx: np.ndarray, opts: ScopeOptions
) -> tuple[Any, ScopeRule, dict[str, Any]]:
    """A net fitted on part of the patients in ``idx`` and its rule chosen on the rest."""
    fit, thr = threshold_split(prep, idx, opts.seed)
    t0 = time.monotonic()
    model, loss = fit_net(prep, fit, opts)
    thr_all = np.concatenate(
        [
            thr,
            prep.where(lambda it: it.kind in ("generated_threshold", "generated_chest_threshold")),
        ]
    )
    rule, facts = choose_rule(prep, thr_all, scores(model, prep, thr_all), default_box(prep, idx))
    fitted = Counter(prep.items[i].kind for i in fit)
    fitted.update(it.kind for it in prep.items if it.kind in ("generated", "generated_chest"))
    facts.update(
        {
            "fitted_on": dict(sorted(fitted.items())),
            "fit_seconds": round(time.monotonic() - t0, 1),
            "loss": loss,
            "fit_patients": sorted({prep.items[i].group for i in fit}),
            "threshold_patients": sorted({prep.items[i].group for i in thr}),
        }
    )
    return model, rule, facts


def decisions(
    prep: Prepared, idx: np.ndarray, out: np.ndarray, rule: ScopeRule
) -> list[LungFinding]:
    return [
        decide(prep.masks[i], (float(s[0]), float(s[1])), rule, CROP_MARGIN)
        for i, s in zip(idx, out, strict=True)
    ]


# --------------------------------------------------------------------------- commands


def train_scope(opts: ScopeOptions, prep: Prepared | None = None) -> dict[str, Any]:
    """``cxr train-scope``: fit on all patients (less the threshold split), write the net
    beside the segmenter's name (:data:`shared.lungs.SCOPE_NET_FILE`) and its metadata."""
    from shared.model_store import save_weights, write_metadata

    t0 = time.monotonic()
    segmenter = LungSegmenter(opts.segmenter, scope_net=False)
    prep = prep or prepare(opts, segmenter)
    real = prep.where(lambda it: it.kind in ("frontal", "overlay", "lateral", "ct"))
    model, rule, facts = train_rule(prep, real, opts)
    sha = save_weights(model, opts.out)
    today = dt.datetime.now(dt.UTC)
    meta = {
        "version": f"cxr-scope-cnn{SEG_SIZE}-{today:%Y%m%d}-{sha[:8]}",
        "sha256": sha,
        "architecture": f"scope-{model.count_params()}",
        "outputs": ["frontal_chest", "child"],
        "input": "the segmenter's input (seg_input) and its lung-probability mask, 128x128x2",
        "created_at": today.isoformat(timespec="seconds"),
        "segmenter": {
            "file": Path(opts.segmenter).name,
            "sha256": segmenter.sha256,
            "version": segmenter.version,
        },
        "decision": {
            "combine": rule.combine,
            "frontal_threshold": rule.frontal_threshold,
            "child_threshold": rule.child_threshold,
            "default_box": [
                rule.default_box.x0,
                rule.default_box.y0,
                rule.default_box.x1,
                rule.default_box.y1,
            ],
            "chosen_on": "the threshold split: training patients held out of fitting",
            "aims": {"frontal_skipped": FRONTAL_SKIP_AIM, "adult_as_child": ADULT_AS_CHILD_AIM},
            "threshold_split": {
                k: v
                for k, v in facts.items()
                if k
                not in ("loss", "fit_patients", "threshold_patients", "fit_seconds", "fitted_on")
            },
        },
        "training": {
            "fitted_on": facts["fitted_on"],
            "pediatric_sources": list(PEDIATRIC_SOURCES),
            "overlay_scenarios": {k: list(v) for k, v in SCENARIOS.items()},
            "overlay_seed0": OVERLAY_SEED0,
            "generated_kinds": list(TRAIN_KINDS),
            "generated_seed0": GENERATED_SEED0,
            "generated_per_kind": GENERATED_PER_KIND,
            "threshold_generated_seed0": THRESHOLD_SEED0,
            "generated_chest_seed0": CHEST_SEED0,
            "generated_chest_films": CHEST_FILMS,
            "threshold_chest_seed0": CHEST_THRESHOLD_SEED0,
            "epochs": opts.epochs,
            "batch_size": opts.batch_size,
            "learning_rate": opts.learning_rate,
            "seed": opts.seed,
            "loss": facts["loss"],
            "fit_patients": facts["fit_patients"],
            "threshold_patients": facts["threshold_patients"],
            "seconds": round(time.monotonic() - t0, 1),
        },
    }
    write_metadata(opts.out, meta)
    return meta


def _rate(
    findings: list[tuple[Item, LungFinding]], wrong: Callable[[LungFinding], bool]
) -> dict[str, Any]:
    n = len(findings)
    bad = [it.file for it, f in findings if wrong(f)]
    return {
        "n": n,
        "wrong": len(bad),
        "rate": round(len(bad) / n, 4) if n else None,
        "reasons": dict(sorted(Counter(f.reason for _, f in findings).items())),
        "wrong_files": bad[:40],  # file names (or generator:seed) only, never pixels
    }


def audit_folds(
    opts: ScopeOptions, n_folds: int = 5, prep: Prepared | None = None
) -> dict[str, Any]:
    """The out-of-fold audit: a net per fold of patients, each film decided by the net that
    never saw its patient, the decisions pooled (see the module docstring)."""
    segmenter = LungSegmenter(opts.segmenter, scope_net=False)
    prep = prep or prepare(opts, segmenter)
    fold = patient_folds(prep, n_folds, opts.seed)
    found: dict[int, LungFinding] = {}
    folds_facts = []
    for k in range(n_folds):
        train = np.array(
            [
                i
                for i, it in enumerate(prep.items)
                if fold[i] not in (k, -1) and it.kind in ("frontal", "overlay", "lateral", "ct")
            ],
            np.int64,
        )
        model, rule, facts = train_rule(prep, train, opts)
        held = np.flatnonzero(fold == k)
        for i, f in zip(held, decisions(prep, held, scores(model, prep, held), rule), strict=True):
            found[int(i)] = f
        folds_facts.append(
            {
                "fold": k,
                "rule": {
                    "combine": rule.combine,
                    "frontal_threshold": rule.frontal_threshold,
                    "child_threshold": rule.child_threshold,
                },
                "fit_seconds": facts["fit_seconds"],
                "held_out_items": len(held),
            }
        )
        log.info("fold %d: %s", k, folds_facts[-1])
    seen = set(
        segmenter.metadata.get("training", {}).get("negatives", {}).get("scope_patients", [])
    )
    # the same films by the lung rule alone (no net: nothing to hold out), for comparison
    before = oof_report(prep, {i: decide(prep.masks[i], None, None) for i in found}, seen)
    return {
        "segmenter": segmenter.version,
        "folds": folds_facts,
        **oof_report(prep, found, seen),
        "lung_rule_alone": {
            "frontal_not_frontal": before["frontal_not_frontal"]["all"],
            "frontal_not_frontal_ap": before["frontal_not_frontal"]["view:AP or AP Supine"],
            "overlay_not_frontal": before["overlay_not_frontal"]["all"],
            "lateral+ct_scored": before["out_of_scope_scored"]["lateral+ct"],
        },
    }


def oof_report(prep: Prepared, found: dict[int, LungFinding], seg_seen: set[str]) -> dict[str, Any]:
    """The figures the issue asks for, from pooled out-of-fold decisions."""

    def pick(pred: Callable[[Item], bool]) -> list[tuple[Item, LungFinding]]:
        return [(it, found[i]) for i, it in enumerate(prep.items) if i in found and pred(it)]

    def not_scored(f: LungFinding) -> bool:
        return f.box is None

    def not_frontal(f: LungFinding) -> bool:
        return f.box is None and f.reason != "pediatric"

    def as_child(f: LungFinding) -> bool:
        return f.reason == "pediatric"

    sources = sorted({it.source for it in prep.items if it.kind == "frontal"})
    views = sorted({it.view for it in prep.items if it.kind == "frontal"})
    rep: dict[str, Any] = {
        "frontal_not_frontal": {
            "all": _rate(pick(lambda it: it.kind == "frontal"), not_frontal),
            **{
                f"source:{s}": _rate(
                    pick(lambda it, s=s: it.kind == "frontal" and it.source == s), not_frontal
                )
                for s in sources
            },
            **{
                f"view:{v}": _rate(
                    pick(lambda it, v=v: it.kind == "frontal" and it.view == v), not_frontal
                )
                for v in views
            },
        },
        "adult_skipped_any_reason": {
            "all": _rate(pick(lambda it: it.kind == "frontal" and it.child == 0), not_scored),
            **{
                f"view:{v}": _rate(
                    pick(lambda it, v=v: it.kind == "frontal" and it.child == 0 and it.view == v),
                    not_scored,
                )
                for v in views
            },
        },
        "overlay_not_frontal": {
            "all": _rate(pick(lambda it: it.kind == "overlay"), not_frontal),
            **{
                f"scenario:{s}": _rate(
                    pick(lambda it, s=s: it.kind == "overlay" and it.scenario == s), not_frontal
                )
                for s in SCENARIOS
            },
        },
        "generated_frontal_skipped": {
            "all": _rate(pick(lambda it: it.kind == "audit_generated_chest"), not_scored),
            "with overlays": _rate(
                pick(lambda it: it.kind == "audit_generated_chest" and it.scenario != ""),
                not_scored,
            ),
        },
        "overlay_adult_skipped_any_reason": _rate(
            pick(lambda it: it.kind == "overlay" and it.child == 0), not_scored
        ),
        "out_of_scope_scored": {
            **{
                k: _rate(pick(lambda it, k=k: it.kind == k), lambda f: not not_scored(f))
                for k in ("lateral", "ct")
            },
            **{
                f"{k}, patients the segmenter never saw": _rate(
                    pick(lambda it, k=k: it.kind == k and it.group not in seg_seen),
                    lambda f: not not_scored(f),
                )
                for k in ("lateral", "ct")
            },
            **{
                f"generated:{k}": _rate(
                    pick(lambda it, k=k: it.kind == "audit_generated" and it.source == k),
                    lambda f: not not_scored(f),
                )
                for k in KINDS
            },
        },
        "adult_refused_as_child": {
            f"source:{s}": _rate(
                pick(lambda it, s=s: it.kind == "frontal" and it.source == s), as_child
            )
            for s in sources
            if s not in PEDIATRIC_SOURCES
        },
        "children": {
            "refused_as_child": _rate(
                pick(lambda it: it.kind == "frontal" and it.child == 1), lambda f: not as_child(f)
            ),
            "skipped_any_reason": _rate(
                pick(lambda it: it.kind == "frontal" and it.child == 1), lambda f: not not_scored(f)
            ),
            "overlay_refused_as_child": _rate(
                pick(lambda it: it.kind == "overlay" and it.child == 1), lambda f: not as_child(f)
            ),
        },
    }
    adults = pick(lambda it: it.kind == "frontal" and it.child == 0)
    rep["adult_refused_as_child"]["all"] = _rate(adults, as_child)
    rep["adult_refused_as_child"]["overlay"] = _rate(
        pick(lambda it: it.kind == "overlay" and it.child == 0), as_child
    )
    real_oos = pick(lambda it: it.kind in ("lateral", "ct"))
    rep["out_of_scope_scored"]["lateral+ct"] = _rate(real_oos, lambda f: not not_scored(f))
    ap = pick(lambda it: it.kind == "frontal" and it.view.upper().startswith("AP"))
    rep["frontal_not_frontal"]["view:AP or AP Supine"] = _rate(ap, not_frontal)
    rep["targets"] = _targets_met(rep)
    return rep


def _targets_met(rep: dict[str, Any]) -> dict[str, Any]:
    def row(value: float | None, limit: float, at_most: bool = True) -> dict[str, Any]:
        met = None if value is None else (value <= limit if at_most else value >= limit)
        return {"value": value, "target": f"{'<=' if at_most else '>='} {limit}", "met": met}

    child_ok = rep["children"]["refused_as_child"]
    child_rate = None if child_ok["rate"] is None else round(1 - child_ok["rate"], 4)
    return {
        "frontal skipped (all)": row(
            rep["frontal_not_frontal"]["all"]["rate"], MAX_FRONTAL_SKIPPED
        ),
        "frontal skipped (AP / AP Supine)": row(
            rep["frontal_not_frontal"]["view:AP or AP Supine"]["rate"], MAX_FRONTAL_SKIPPED
        ),
        "ICU-overlay films skipped": row(
            rep["overlay_not_frontal"]["all"]["rate"], MAX_FRONTAL_SKIPPED
        ),
        "lateral and CT scored": row(
            rep["out_of_scope_scored"]["lateral+ct"]["rate"], MAX_OUT_OF_SCOPE_SCORED
        ),
        "adult films refused as pediatric": row(
            rep["adult_refused_as_child"]["all"]["rate"], MAX_ADULT_AS_CHILD
        ),
        "children refused as pediatric": row(child_rate, MIN_CHILDREN_SKIPPED, at_most=False),
    }


def report_lines(rep: dict[str, Any]) -> list[str]:
    lines = [f"segmenter {rep['segmenter']}, {len(rep['folds'])} folds by patient (out of fold)"]
    for f in rep["folds"]:
        lines.append(f"  fold {f['fold']}: {f['rule']}  fit {f['fit_seconds']} s")
    for key in (
        "frontal_not_frontal",
        "adult_skipped_any_reason",
        "overlay_not_frontal",
        "generated_frontal_skipped",
        "out_of_scope_scored",
        "adult_refused_as_child",
        "children",
    ):
        block = rep[key]
        if "n" in block:
            block = {"all": block}
        for name, b in block.items():
            lines.append(
                f"  {key:26s} {name:44s} n={b['n']:<5d} wrong {b['wrong']:<4d} "
                f"({b['rate']})  {b['reasons']}"
            )
    lines.append(
        f"  {'overlay_adult_skipped_any_reason':26s} {'all':44s} "
        f"n={rep['overlay_adult_skipped_any_reason']['n']:<5d} "
        f"wrong {rep['overlay_adult_skipped_any_reason']['wrong']}"
    )
    for name, b in rep.get("lung_rule_alone", {}).items():
        lines.append(f"  lung rule alone: {name:30s} n={b['n']:<5d} wrong {b['wrong']}")
    for name, t in rep["targets"].items():
        verdict = {True: "met", False: "MISSED", None: "n/a"}[t["met"]]
        lines.append(f"{name}: {t['value']} (target {t['target']}) {verdict}")
    return lines
