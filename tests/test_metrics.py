"""Metrics against hand-computed values, and the patient-clustered bootstrap."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from ml.metrics import (
    METRICS,
    auc_score,
    bootstrap_metrics,
    confusion,
    metric_block,
    point_metrics,
    roc_curve,
)


def pairwise_auc(y: np.ndarray, p: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties count half: the definition."""
    pos = [s for s, t in zip(p, y, strict=True) if t]
    neg = [s for s, t in zip(p, y, strict=True) if not t]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


# --------------------------------------------------------------------------- AUC


@pytest.mark.parametrize(
    ("y", "p", "expected"),
    [
        ([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9], 1.0),
        ([0, 0, 1, 1], [0.8, 0.9, 0.1, 0.2], 0.0),
        ([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5], 0.5),
        ([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8], 0.75),
        ([0, 0, 1, 1], [0.2, 0.5, 0.5, 0.9], 0.875),
        ([1, 0, 0, 0], [0.3, 0.1, 0.3, 0.5], 0.5),
        ([0, 1], [0.7, 0.7], 0.5),
        ([1, 0, 1, 0, 1], [0.9, 0.9, 0.1, 0.05, 0.6], 7 / 12),
    ],
)
def test_auc_hand_values(y: list[int], p: list[float], expected: float) -> None:
    assert auc_score(np.array(y), np.array(p)) == pytest.approx(expected)


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_the_pairwise_definition_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 40)
    y[:2] = [0, 1]
    p = rng.integers(0, 6, 40) / 5.0  # many ties
    assert auc_score(y, p) == pytest.approx(pairwise_auc(y, p))


def test_auc_does_not_depend_on_row_order() -> None:
    y = np.array([0, 1, 1, 0, 1, 0, 0])
    p = np.array([0.2, 0.7, 0.2, 0.4, 0.9, 0.7, 0.1])
    perm = np.array([6, 2, 0, 5, 1, 4, 3])
    assert auc_score(y, p) == pytest.approx(auc_score(y[perm], p[perm]))


@pytest.mark.parametrize("y", [[1, 1, 1], [0, 0], [], [True]])
def test_auc_undefined_for_one_class(y: list[int]) -> None:
    assert auc_score(np.array(y, dtype=int), np.linspace(0, 1, len(y))) is None


# --------------------------------------------------------------------------- point metrics


Y = np.array([1, 1, 1, 0, 0])
P = np.array([0.9, 0.6, 0.2, 0.7, 0.1])


def test_confusion_hand_example() -> None:
    assert confusion(Y, P, 0.5) == {"tp": 2, "fp": 1, "tn": 1, "fn": 1}
    assert confusion(Y, P, 0.65) == {"tp": 1, "fp": 1, "tn": 1, "fn": 2}
    assert confusion(Y, P, 0.0) == {"tp": 3, "fp": 2, "tn": 0, "fn": 0}


def test_point_metrics_hand_example() -> None:
    m = point_metrics(Y, P, 0.5)
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(1 / 2)
    assert m["auc"] == pytest.approx(pairwise_auc(Y, P)) == pytest.approx(4 / 6)
    assert set(m) == set(METRICS)


def test_threshold_is_inclusive() -> None:
    y = np.array([1, 0])
    p = np.array([0.5, 0.4999])
    assert confusion(y, p, 0.5) == {"tp": 1, "fp": 0, "tn": 1, "fn": 0}
    assert point_metrics(y, p, 0.5)["accuracy"] == 1.0


def test_point_metrics_undefined_parts() -> None:
    m = point_metrics(np.array([0, 0, 0]), np.array([0.1, 0.6, 0.2]), 0.5)
    assert m["sensitivity"] is None
    assert m["auc"] is None
    assert m["specificity"] == pytest.approx(2 / 3)
    assert m["accuracy"] == pytest.approx(2 / 3)
    empty = point_metrics(np.array([], int), np.array([], float), 0.5)
    assert empty == {"accuracy": None, "sensitivity": None, "specificity": None, "auc": None}


# --------------------------------------------------------------------------- bootstrap


def _example(n: int = 120, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p = np.clip(0.3 * y + rng.uniform(0, 0.7, n), 0, 1)
    return y, p


def test_bootstrap_structure_and_intervals() -> None:
    y, p = _example()
    out = bootstrap_metrics(y, p, 0.5, n_boot=300, seed=3)
    point = point_metrics(y, p, 0.5)
    assert set(out) == set(METRICS)
    for name in METRICS:
        assert set(out[name]) == {"value", "ci95"}
        value, ci = out[name]["value"], out[name]["ci95"]
        assert value == pytest.approx(point[name])
        assert isinstance(value, float)
        assert isinstance(ci, list)
        assert len(ci) == 2
        lo, hi = ci
        assert 0.0 <= lo <= value <= hi <= 1.0, name
        assert hi - lo > 0.01, name  # a real interval, not a point
        assert hi - lo < 0.5, name


def test_bootstrap_interval_is_95_percent() -> None:
    """Accuracy 0.5 on 400 independent rows: standard error 0.025, 95% width about 0.098
    (a 90% interval would be about 0.082, a 99% one about 0.129)."""
    y = np.repeat([1, 0], 200)
    p = np.tile([0.9, 0.1], 200)  # right on exactly half of each class
    out = bootstrap_metrics(y, p, 0.5, n_boot=2000, seed=0)
    assert out["accuracy"]["value"] == 0.5
    lo, hi = out["accuracy"]["ci95"]
    assert 0.09 <= hi - lo <= 0.107
    assert lo < 0.5 < hi


def test_bootstrap_is_reproducible_with_a_seed() -> None:
    y, p = _example()
    a = bootstrap_metrics(y, p, 0.5, n_boot=200, seed=11)
    b = bootstrap_metrics(y, p, 0.5, n_boot=200, seed=11)
    c = bootstrap_metrics(y, p, 0.5, n_boot=200, seed=12)
    assert a == b
    assert a != c


def test_patient_grouping_widens_the_interval() -> None:
    """10 patients with 20 identical films each: only 10 independent units, not 200."""
    rng = np.random.default_rng(5)
    patient_y = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0, 0])
    patient_p = np.array([0.9, 0.8, 0.7, 0.3, 0.2, 0.1, 0.2, 0.6, 0.4, 0.35])
    films = 20
    y = np.repeat(patient_y, films)
    p = np.repeat(patient_p, films)
    groups = np.repeat([f"patient-{i}" for i in range(10)], films)
    order = rng.permutation(len(y))  # films of one patient need not be adjacent
    y, p, groups = y[order], p[order], groups[order]

    by_patient = bootstrap_metrics(y, p, 0.5, groups=list(groups), n_boot=400, seed=0)
    by_row = bootstrap_metrics(y, p, 0.5, groups=None, n_boot=400, seed=0)
    for name in METRICS:
        assert by_patient[name]["value"] == pytest.approx(by_row[name]["value"])
        width_patient = np.diff(by_patient[name]["ci95"])[0]
        width_row = np.diff(by_row[name]["ci95"])[0]
        assert width_patient >= width_row, name
    assert np.diff(by_patient["accuracy"]["ci95"])[0] > 2 * np.diff(by_row["accuracy"]["ci95"])[0]


def test_unique_groups_equal_rows() -> None:
    y, p = _example(60)
    groups = [f"g{i:03d}" for i in range(len(y))]  # sorted like the rows
    assert bootstrap_metrics(y, p, 0.5, groups, n_boot=100, seed=4) == bootstrap_metrics(
        y, p, 0.5, None, n_boot=100, seed=4
    )


def test_undefined_metric_has_no_value_and_no_interval() -> None:
    y = np.zeros(30, int)
    p = np.linspace(0, 1, 30)
    out = bootstrap_metrics(y, p, 0.5, n_boot=100)
    assert out["sensitivity"] == {"value": None, "ci95": None}
    assert out["auc"] == {"value": None, "ci95": None}
    assert out["specificity"]["value"] == pytest.approx(15 / 30)
    lo, hi = out["specificity"]["ci95"]
    assert lo <= 0.5 <= hi


def test_bootstrap_of_nothing() -> None:
    out = bootstrap_metrics([], [], 0.5, groups=[], n_boot=50)
    assert out == {m: {"value": None, "ci95": None} for m in METRICS}


def test_perfect_classifier_has_degenerate_intervals() -> None:
    y = np.array([0] * 10 + [1] * 10)
    p = np.r_[np.linspace(0.0, 0.4, 10), np.linspace(0.6, 1.0, 10)]
    out = bootstrap_metrics(y, p, 0.5, n_boot=200)
    for name in METRICS:
        assert out[name] == {"value": 1.0, "ci95": [1.0, 1.0]}


def test_metric_block() -> None:
    block = metric_block(Y, P, ["a", "a", "b", "c", "d"], 0.5, n_boot=50)
    assert block["n"] == 5
    assert block["confusion"] == {"tp": 2, "fp": 1, "tn": 1, "fn": 1}
    assert block["accuracy"]["value"] == pytest.approx(0.6)
    assert set(block) == {"n", "confusion", *METRICS}


# --------------------------------------------------------------------------- ROC


@pytest.mark.parametrize("seed", range(4))
def test_roc_curve_shape_and_area(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 50)
    y[:2] = [0, 1]
    p = rng.integers(0, 8, 50) / 7.0  # ties
    fpr, tpr = roc_curve(y, p)
    assert len(fpr) == len(tpr) == len(np.unique(p)) + 1
    assert (fpr[0], tpr[0]) == (0.0, 0.0)
    assert fpr[-1] == pytest.approx(1.0)
    assert tpr[-1] == pytest.approx(1.0)
    assert np.all(np.diff(fpr) >= 0)
    assert np.all(np.diff(tpr) >= 0)
    assert np.all((fpr >= 0) & (fpr <= 1) & (tpr >= 0) & (tpr <= 1))
    area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    assert area == pytest.approx(auc_score(y, p))


def test_roc_curve_hand_example() -> None:
    fpr, tpr = roc_curve(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
    np.testing.assert_allclose(fpr, [0.0, 0.0, 0.5, 0.5, 1.0])
    np.testing.assert_allclose(tpr, [0.0, 0.5, 0.5, 1.0, 1.0])
