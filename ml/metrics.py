"""Classification metrics with patient-clustered bootstrap intervals (NumPy only)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

METRICS = ("accuracy", "sensitivity", "specificity", "auc")


def fmt(value: float | None) -> str:
    """A metric as every report prints it: three decimals, or ``n/a`` where undefined."""
    return "n/a" if value is None else f"{value:.3f}"


def auc_score(y: np.ndarray, p: np.ndarray) -> float | None:
    """ROC AUC by the Mann-Whitney rank statistic (ties count half); None for one class."""
    y = np.asarray(y, bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(p, kind="mergesort")
    ranks = np.empty(len(p), float)
    sorted_p = np.asarray(p)[order]
    # average ranks over ties
    i = 0
    while i < len(sorted_p):
        j = i
        while j + 1 < len(sorted_p) and sorted_p[j + 1] == sorted_p[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def point_metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float | None]:
    y = np.asarray(y, bool)
    pred = np.asarray(p) >= threshold
    n = len(y)
    tp = int((pred & y).sum())
    tn = int((~pred & ~y).sum())
    pos, neg = int(y.sum()), int((~y).sum())
    return {
        "accuracy": (tp + tn) / n if n else None,
        "sensitivity": tp / pos if pos else None,
        "specificity": tn / neg if neg else None,
        "auc": auc_score(y, p),
    }


def confusion(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, int]:
    y = np.asarray(y, bool)
    pred = np.asarray(p) >= threshold
    return {
        "tp": int((pred & y).sum()),
        "fp": int((pred & ~y).sum()),
        "tn": int((~pred & ~y).sum()),
        "fn": int((~pred & y).sum()),
    }


def bootstrap_metrics(
    y: Sequence[int] | np.ndarray,
    p: Sequence[float] | np.ndarray,
    threshold: float,
    groups: Sequence[str] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Each metric as ``{"value": x, "ci95": [lo, hi]}``.

    Resamples whole groups (patients) with replacement where ``groups`` is given, so that several
    films of one patient do not narrow the interval.  Percentile intervals; a metric undefined on
    the full data has value and interval None; resamples where it is undefined are skipped.
    """
    y = np.asarray(y, bool)
    p = np.asarray(p, float)
    values = point_metrics(y, p, threshold)
    if groups is None:
        groups_arr = np.arange(len(y))
    else:
        _, groups_arr = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    n_groups = int(groups_arr.max()) + 1 if len(y) else 0
    members = [np.flatnonzero(groups_arr == g) for g in range(n_groups)]
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {m: [] for m in METRICS}
    for _ in range(n_boot if n_groups else 0):
        pick = rng.integers(0, n_groups, n_groups)
        idx = np.concatenate([members[g] for g in pick])
        for name, value in point_metrics(y[idx], p[idx], threshold).items():
            if value is not None:
                samples[name].append(value)
    out: dict[str, dict[str, Any]] = {}
    for name in METRICS:
        value = values[name]
        ci: list[float] | None = None
        if value is not None and samples[name]:
            lo, hi = np.percentile(samples[name], [2.5, 97.5])
            ci = [float(lo), float(hi)]
        out[name] = {"value": None if value is None else float(value), "ci95": ci}
    return out


def roc_curve(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) at every distinct threshold."""
    y = np.asarray(y, bool)
    order = np.argsort(-np.asarray(p), kind="mergesort")
    ys, ps = y[order], np.asarray(p)[order]
    distinct = np.r_[np.flatnonzero(np.diff(ps)), len(ps) - 1]
    tps = np.cumsum(ys)[distinct]
    fps = (distinct + 1) - tps
    pos, neg = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    return np.r_[0.0, fps / neg], np.r_[0.0, tps / pos]


def blocks_by_key(
    y: np.ndarray,
    p: np.ndarray,
    groups: Sequence[str],
    keys: Sequence[str],
    threshold: float,
    n_boot: int = 1000,
) -> dict[str, dict[str, Any]]:
    """:func:`metric_block` for each distinct non-empty key (e.g. each source)."""
    keys_arr = np.asarray(keys, dtype=str)
    out: dict[str, dict[str, Any]] = {}
    for key in sorted({k for k in keys_arr if k}):
        idx = np.flatnonzero(keys_arr == key)
        out[key] = metric_block(
            np.asarray(y)[idx], np.asarray(p)[idx], [groups[i] for i in idx], threshold, n_boot
        )
    return out


def metric_block(
    y: np.ndarray, p: np.ndarray, groups: Sequence[str], threshold: float, n_boot: int = 1000
) -> dict[str, Any]:
    """``n``, the four metrics with intervals, and the confusion matrix at ``threshold``."""
    out: dict[str, Any] = {"n": len(y)}
    out.update(bootstrap_metrics(y, p, threshold, groups, n_boot))
    out["confusion"] = confusion(y, p, threshold)
    return out
