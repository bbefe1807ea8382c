"""Calibration and the decision threshold, both fitted on the early-stopping split only.

Invariant: nothing here ever sees the validation split, so the validation report measures the
calibrated probability and the threshold as a hospital would meet them.  Platt scaling is a
logistic regression (scikit-learn) on the network's logit; applying it is
:func:`shared.model_store.calibrate`, which the workers use.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_curve

from shared.model_store import calibrate, logit


def fit_platt(y: np.ndarray, raw: np.ndarray, fitted_on: str) -> dict[str, Any]:
    """Platt scaling: P(covid) = sigmoid(slope * logit(raw) + intercept)."""
    y = np.asarray(y, int)
    if len(set(y.tolist())) < 2:
        raise ValueError("calibration needs both classes in its split")
    lr = LogisticRegression(C=1e6, max_iter=1000)  # ~unregularised: two parameters, many films
    lr.fit(logit(raw)[:, None], y)
    return {
        "method": "platt",
        "slope": round(float(lr.coef_[0, 0]), 6),
        "intercept": round(float(lr.intercept_[0]), 6),
        "fitted_on": fitted_on,
        "n": len(y),
    }


def threshold_for_sensitivity(y: np.ndarray, p: np.ndarray, target: float) -> float:
    """The highest threshold whose sensitivity on (y, p) is at least ``target``."""
    y = np.asarray(y, int)
    if not y.any():
        raise ValueError("choosing a threshold for sensitivity needs positive films")
    # every point: the default drops those on vertical stretches, where the highest one lies
    _, tpr, thresholds = roc_curve(y, p, drop_intermediate=False)
    ok = np.flatnonzero(tpr >= target)
    return float(min(1.0, thresholds[ok[0]]))


def calibrate_and_choose(
    y: np.ndarray,
    raw: np.ndarray,
    adult: np.ndarray,
    target_sensitivity: float,
    fitted_on: str,
) -> tuple[dict[str, Any], float]:
    """Fit Platt scaling on all films of the split; choose the threshold on its adult films."""
    calibration = fit_platt(y, raw, fitted_on)
    p = calibrate(raw, calibration)
    adult = np.asarray(adult, bool)
    threshold = threshold_for_sensitivity(np.asarray(y)[adult], p[adult], target_sensitivity)
    calibration["threshold_rule"] = (
        f"highest threshold with adult (same-source) sensitivity >= {target_sensitivity} "
        f"on the {fitted_on}"
    )
    # floor, not round: the film that set the threshold must stay above it
    return calibration, math.floor(threshold * 1e6) / 1e6
