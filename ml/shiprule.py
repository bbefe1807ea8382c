"""The ship rule: how recipes are compared, on out-of-fold predictions.

A hospital lives by its false-positive rate on normal adults at a sensitivity it can accept,
not by an AUC.  So, at the threshold that gives same-source adult COVID-19 films sensitivity
:data:`SHIP_SENSITIVITY` (the highest such threshold), the rule's score is the mean of the
specificity on same-source adult non-COVID films (ieee8023 + actualmed) and on NIH films; AUCs
are reported beside it, never instead of it.

Invariant: the threshold is re-chosen inside every bootstrap resample (whole patients
resampled), so the interval includes the uncertainty of choosing the threshold, and the score is
computed only on predictions made by models that never saw those patients.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ml.calibration import threshold_for_sensitivity
from ml.dataset import NIH_SOURCE, PEDIATRIC_SOURCES, SAME_SOURCE_ADULT
from ml.metrics import auc_score

SHIP_SENSITIVITY = 0.85
RULE_KEYS = (
    "score",
    "same_source_specificity",
    "nih_specificity",
    "pediatric_specificity",
    "adult_auc",
    "same_source_auc",
    "mixed_auc",
    "audit_adult_vs_pediatric",
)


def _spec(y: np.ndarray, p: np.ndarray, mask: np.ndarray, threshold: float) -> float | None:
    neg = mask & (y == 0)
    return float((p[neg] < threshold).mean()) if neg.any() else None


def rule_point(
    y: Sequence[int] | np.ndarray,
    p: Sequence[float] | np.ndarray,
    sources: Sequence[str] | np.ndarray,
    sensitivity: float = SHIP_SENSITIVITY,
) -> dict[str, Any]:
    """The rule on one set of predictions: threshold, score, its parts and the AUCs."""
    y = np.asarray(y, int)
    p = np.asarray(p, float)
    src = np.asarray(sources, dtype=str)
    same = np.isin(src, SAME_SOURCE_ADULT)
    nih = src == NIH_SOURCE
    ped = np.isin(src, PEDIATRIC_SOURCES)
    adult = same | nih
    out: dict[str, Any] = dict.fromkeys(("threshold", *RULE_KEYS))
    if (y[same] == 1).any():
        t = threshold_for_sensitivity(y[same], p[same], sensitivity)
        out["threshold"] = t
        out["sensitivity"] = float((p[same & (y == 1)] >= t).mean())
        out["same_source_specificity"] = _spec(y, p, same, t)
        out["nih_specificity"] = _spec(y, p, nih, t)
        out["pediatric_specificity"] = _spec(y, p, ped, t)
        parts = [out["same_source_specificity"], out["nih_specificity"]]
        parts = [v for v in parts if v is not None]
        out["score"] = float(np.mean(parts)) if len(parts) == 2 else None
    out["same_source_auc"] = auc_score(y[same], p[same])
    # all adults: COVID-19 against same-source and NIH non-COVID films, half each
    out["adult_auc"] = _balanced_adult_auc(y, p, same, nih)
    out["mixed_auc"] = auc_score(y, p)
    neg = y == 0
    both = neg & (adult | ped)
    out["audit_adult_vs_pediatric"] = auc_score(adult[both], p[both]) if both.any() else None
    return out


def _balanced_adult_auc(
    y: np.ndarray, p: np.ndarray, same: np.ndarray, nih: np.ndarray
) -> float | None:
    """Mean of the AUC of adult COVID-19 against same-source non-COVID and against NIH films:
    so that telling NIH's hospital apart cannot earn more than half of it."""
    pos = (same | nih) & (y == 1)
    parts = []
    for neg in (same & (y == 0), nih & (y == 0)):
        if pos.any() and neg.any():
            idx = pos | neg
            parts.append(auc_score(y[idx], p[idx]))
    return float(np.mean(parts)) if len(parts) == 2 else None


def rule_with_intervals(
    y: Sequence[int] | np.ndarray,
    p: Sequence[float] | np.ndarray,
    sources: Sequence[str] | np.ndarray,
    groups: Sequence[str] | np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
    sensitivity: float = SHIP_SENSITIVITY,
) -> dict[str, Any]:
    """:func:`rule_point` with a 95% percentile interval for each key, resampling patients."""
    y = np.asarray(y, int)
    p = np.asarray(p, float)
    src = np.asarray(sources, dtype=str)
    point = rule_point(y, p, src, sensitivity)
    _, g = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    members = [np.flatnonzero(g == i) for i in range(int(g.max()) + 1)] if len(g) else []
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {k: [] for k in ("threshold", *RULE_KEYS)}
    for _ in range(n_boot if members else 0):
        pick = rng.integers(0, len(members), len(members))
        idx = np.concatenate([members[i] for i in pick])
        for key, value in rule_point(y[idx], p[idx], src[idx], sensitivity).items():
            if key in samples and value is not None:
                samples[key].append(value)
    out: dict[str, Any] = {"sensitivity_target": sensitivity}
    for key in ("threshold", *RULE_KEYS):
        value = point.get(key)
        ci = None
        if value is not None and samples[key]:
            lo, hi = np.percentile(samples[key], [2.5, 97.5])
            ci = [round(float(lo), 4), round(float(hi), 4)]
        out[key] = {"value": None if value is None else round(float(value), 4), "ci95": ci}
    out["sensitivity"] = point.get("sensitivity")
    return out


def spread(per_fold: Sequence[dict[str, Any]], key: str) -> dict[str, float | None]:
    """Mean, standard deviation, min and max of one rule key across folds."""
    values = [f[key] for f in per_fold if f.get(key) is not None]
    if not values:
        return {"mean": None, "sd": None, "min": None, "max": None, "n": 0}
    arr = np.asarray(values, float)
    return {
        "mean": round(float(arr.mean()), 4),
        "sd": round(float(arr.std(ddof=1)), 4) if len(arr) > 1 else None,
        "min": round(float(arr.min()), 4),
        "max": round(float(arr.max()), 4),
        "n": len(arr),
    }


def paired_difference(
    y: Sequence[int] | np.ndarray,
    p_base: Sequence[float] | np.ndarray,
    p_other: Sequence[float] | np.ndarray,
    sources: Sequence[str] | np.ndarray,
    groups: Sequence[str] | np.ndarray,
    keys: Sequence[str] = ("score", "adult_auc", "same_source_auc", "nih_specificity"),
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """``other - base`` for each rule key on the same films, with a paired patient bootstrap
    (both recipes resampled together): whether a lever helps is read off this interval, not
    off two overlapping ones."""
    y = np.asarray(y, int)
    a, b = np.asarray(p_base, float), np.asarray(p_other, float)
    src = np.asarray(sources, dtype=str)
    _, g = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    members = [np.flatnonzero(g == i) for i in range(int(g.max()) + 1)] if len(g) else []

    def diff(idx: np.ndarray) -> dict[str, float | None]:
        ra, rb = rule_point(y[idx], a[idx], src[idx]), rule_point(y[idx], b[idx], src[idx])
        return {k: None if ra[k] is None or rb[k] is None else float(rb[k] - ra[k]) for k in keys}

    point = diff(np.arange(len(y)))
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {k: [] for k in keys}
    for _ in range(n_boot if members else 0):
        pick = rng.integers(0, len(members), len(members))
        for k, v in diff(np.concatenate([members[i] for i in pick])).items():
            if v is not None:
                samples[k].append(v)
    out: dict[str, Any] = {}
    for k in keys:
        ci = None
        if point[k] is not None and samples[k]:
            lo, hi = np.percentile(samples[k], [2.5, 97.5])
            ci = [round(float(lo), 4), round(float(hi), 4)]
        out[k] = {"value": None if point[k] is None else round(point[k], 4), "ci95": ci}
    return out
