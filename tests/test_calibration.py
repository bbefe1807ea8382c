"""Calibration, threshold choice and the report's audits, on inputs whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest

from ml.calibration import calibrate_and_choose, fit_platt, threshold_for_sensitivity
from ml.dataset import Record
from ml.report import audits, expected_calibration_error, validation_report
from shared.model_store import calibrate


def _logistic_sample(slope: float, intercept: float, n: int = 20_000) -> tuple[np.ndarray, ...]:
    """Raw scores whose true P(y=1) is sigmoid(slope * logit(raw) + intercept)."""
    rng = np.random.default_rng(3)
    raw = rng.uniform(0.01, 0.99, n)
    logit = np.log(raw / (1 - raw))
    p_true = 1 / (1 + np.exp(-(slope * logit + intercept)))
    y = (rng.random(n) < p_true).astype(int)
    return y, raw


def test_platt_recovers_a_known_distortion() -> None:
    y, raw = _logistic_sample(slope=0.5, intercept=-1.0)
    cal = fit_platt(y, raw, "test split")
    assert cal["slope"] == pytest.approx(0.5, abs=0.05)
    assert cal["intercept"] == pytest.approx(-1.0, abs=0.08)
    assert cal["method"] == "platt"
    assert cal["n"] == len(y)


def test_calibration_lowers_the_error_of_an_overconfident_score() -> None:
    y, raw = _logistic_sample(slope=0.5, intercept=-1.0)
    before = expected_calibration_error(y, raw)
    after = expected_calibration_error(y, calibrate(raw, fit_platt(y, raw, "t")))
    assert before > 0.1
    assert after < 0.02


def test_no_calibration_is_the_identity() -> None:
    raw = np.array([0.0, 0.2, 0.5, 0.97], np.float32)
    assert np.array_equal(calibrate(raw, None), raw)


def test_calibration_is_monotone() -> None:
    raw = np.linspace(0.001, 0.999, 200)
    out = calibrate(raw, {"slope": 0.7, "intercept": 0.3})
    assert np.all(np.diff(out) > 0)


def test_threshold_keeps_the_asked_sensitivity_and_is_the_highest_that_does() -> None:
    y = np.array([1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0])
    p = np.array([0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.1, 0.5, 0.3, 0.2])
    t = threshold_for_sensitivity(y, p, 0.9)
    assert t == pytest.approx(0.55)  # 9 of 10 positives at or above it
    assert ((p >= t) & (y == 1)).sum() / y.sum() >= 0.9
    assert threshold_for_sensitivity(y, p, 1.0) == pytest.approx(0.1)


def test_threshold_is_chosen_on_adult_films_only() -> None:
    y, raw = _logistic_sample(slope=1.0, intercept=0.0, n=2000)
    adult = np.zeros(len(y), bool)
    adult[:500] = True
    raw = raw.copy()
    raw[~adult & (y == 1)] = 0.02  # the other films' positives score low
    cal, t = calibrate_and_choose(y, raw, adult, 0.9, "test split")
    p = calibrate(raw, cal)
    expected = threshold_for_sensitivity(y[adult], p[adult], 0.9)
    assert t == pytest.approx(expected, abs=1e-6)
    assert abs(t - threshold_for_sensitivity(y, p, 0.9)) > 0.05  # all films would differ
    assert "adult" in cal["threshold_rule"]


def test_threshold_on_a_vertical_stretch_of_the_roc_is_still_the_highest() -> None:
    y = np.array([1, 1, 1, 1, 1, 0])
    p = np.array([0.95, 0.85, 0.75, 0.65, 0.55, 0.1])
    assert threshold_for_sensitivity(y, p, 0.5) == pytest.approx(0.75)


def test_expected_calibration_error_of_known_bins() -> None:
    y = np.array([1, 0, 1, 1])
    p = np.array([0.05, 0.05, 0.95, 0.95])  # bin 0: rate 0.5 vs 0.05; bin 9: rate 1 vs 0.95
    assert expected_calibration_error(y, p) == pytest.approx((2 * 0.45 + 2 * 0.05) / 4)


def _records() -> list[Record]:
    rows = [("ieee8023", 1)] * 4 + [("ieee8023", 0)] * 2 + [("actualmed", 0)] * 2
    rows += [("nih", 0)] * 4 + [("kermany", 0)] * 4
    return [Record(f"f{i}", label, src, f"p{i}") for i, (src, label) in enumerate(rows)]


def test_audits_see_a_score_that_only_knows_the_source() -> None:
    records = _records()
    # pediatric films score highest, NIH lowest: the score carries the source, not the disease
    score = {"ieee8023": 0.5, "actualmed": 0.5, "nih": 0.1, "kermany": 0.9}
    probs = np.array([score[r.source] for r in records])
    a = audits(records, probs)
    assert a["audit_adult_vs_pediatric"] == 0.0  # every adult below every child
    assert a["audit_nih_vs_same_source"] == 0.0  # every NIH film below every same-source film


def test_audits_are_half_for_a_score_blind_to_the_source() -> None:
    records = _records()
    probs = np.full(len(records), 0.3)
    assert audits(records, probs) == {
        "audit_adult_vs_pediatric": 0.5,
        "audit_nih_vs_same_source": 0.5,
    }


def test_report_headline_is_same_source_adults_and_counts_skipped() -> None:
    records = _records()
    probs = np.array([0.9, 0.8, 0.7, 0.6, 0.65, 0.1, 0.2, 0.3, 0.1, 0.1, 0.9, 0.1, 0, 0, 0, 0])
    skipped = [Record("s1", 0, "nih", "q1"), Record("s2", 1, "ieee8023", "q2")]
    r = validation_report(records, probs, 0.5, n_boot=50, skipped=skipped)
    assert r["adult"]["n"] == 8  # ieee8023 + actualmed only
    assert r["adult"]["auc"]["value"] == pytest.approx(15 / 16)
    assert r["by_source"]["nih"]["specificity"]["value"] == 0.75
    assert r["skipped"] == {"n": 2, "by_source": {"ieee8023": 1, "nih": 1}}
    assert r["targets"]["adult_auc"]["met"] is True
    assert r["targets"]["nih_specificity"]["met"] is False


def test_an_audit_far_below_half_misses_its_target_too() -> None:
    records = _records()
    score = {"ieee8023": 0.5, "actualmed": 0.5, "nih": 0.5, "kermany": 0.9}  # children higher
    probs = np.array([score[r.source] for r in records])
    r = validation_report(records, probs, 0.5, n_boot=20)
    audit = r["targets"]["audit_adult_vs_pediatric"]
    assert audit["value"] == 0.0
    assert audit["separation"] == 1.0
    assert audit["met"] is False
