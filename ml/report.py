"""The one validation report, written by ``cxr train`` into the metadata and by ``cxr evaluate``.

Invariant: every number is computed on films the model was not trained on, at the model's own
threshold, with 95% intervals from resampling whole patients.  The headline is the ``adult``
block: COVID-19 against non-COVID films *from the same collections* (ieee8023 + actualmed), so a
score that only tells one hospital from another cannot earn it.  Beside it: each source, the
paper-style ``mixed`` block, the shortcut ``audits`` (how well the score tells the *source* of
non-COVID films; 0.5 means it carries none), calibration, and the films that were skipped as
not frontal chest radiographs (never silently dropped).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import brier_score_loss

from ml.dataset import NIH_SOURCE, PEDIATRIC_SOURCES, SAME_SOURCE_ADULT, Record
from ml.metrics import METRICS, auc_score, blocks_by_key, fmt, metric_block

#: Targets of issue 7 on the adult validation films; the model card reports each as met or not.
#: Audits are judged on max(AUC, 1 - AUC): see :func:`targets_met`.
TARGETS = {
    "adult_auc": (">=", 0.85),
    "adult_specificity": (">=", 0.50),
    "nih_specificity": (">=", 0.80),
    "audit_adult_vs_pediatric": ("<=", 0.70),
    "audit_nih_vs_same_source": ("<=", 0.70),
}
ECE_BINS = 10


def expected_calibration_error(y: np.ndarray, p: np.ndarray, bins: int = ECE_BINS) -> float:
    """Mean |observed rate - mean probability| over equal-width bins, weighted by bin size."""
    y, p = np.asarray(y, float), np.asarray(p, float)
    which = np.minimum((p * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            total += inside.sum() * abs(y[inside].mean() - p[inside].mean())
    return float(total / max(len(y), 1))


def calibration_block(y: np.ndarray, p: np.ndarray) -> dict[str, float | None]:
    if len(y) == 0:
        return {"brier": None, "ece": None}
    return {
        "brier": round(float(brier_score_loss(y, p)), 4),
        "ece": round(expected_calibration_error(y, p), 4),
    }


def audits(records: Sequence[Record], probs: np.ndarray) -> dict[str, float | None]:
    """Among non-COVID films: AUC of the score for adult vs pediatric, NIH vs same-source adult."""
    sources = np.array([r.source for r in records])
    neg = np.array([r.label == 0 for r in records], bool)
    same = neg & np.isin(sources, SAME_SOURCE_ADULT)
    nih = neg & (sources == NIH_SOURCE)
    ped = neg & np.isin(sources, PEDIATRIC_SOURCES)
    adult = same | nih
    both = adult | ped
    return {
        "audit_adult_vs_pediatric": auc_score(adult[both], probs[both]),
        "audit_nih_vs_same_source": auc_score(nih[adult], probs[adult]),
    }


def validation_report(
    records: Sequence[Record],
    probs: np.ndarray,
    threshold: float,
    n_boot: int = 1000,
    skipped: Sequence[Record] = (),
) -> dict[str, Any]:
    """Headline adult block, per source, mixed, audits, calibration, skipped counts, targets."""
    probs = np.asarray(probs, float)
    y = np.array([r.label for r in records], int)
    groups = [r.group for r in records]
    sources = np.array([r.source for r in records])
    report: dict[str, Any] = {"threshold": threshold}
    report["mixed"] = metric_block(y, probs, groups, threshold, n_boot)
    adult = np.isin(sources, SAME_SOURCE_ADULT)
    if adult.any():
        idx = np.flatnonzero(adult)
        report["adult"] = metric_block(
            y[idx], probs[idx], [groups[i] for i in idx], threshold, n_boot
        )
    report["by_source"] = blocks_by_key(y, probs, groups, sources, threshold, n_boot)
    report["audits"] = audits(records, probs)
    report["calibration"] = {
        "mixed": calibration_block(y, probs),
        "adult": calibration_block(y[adult], probs[adult]),
    }
    report["skipped"] = {
        "n": len(skipped),
        "by_source": dict(sorted(Counter(r.source or "-" for r in skipped).items())),
    }
    report["targets"] = targets_met(report)
    return report


def _value(report: dict[str, Any], name: str) -> float | None:
    if name.startswith("audit_"):
        return report["audits"].get(name)
    block, metric = name.split("_", 1)
    if block == "nih":
        return report["by_source"].get(NIH_SOURCE, {}).get(metric, {}).get("value")
    return report.get(block, {}).get(metric, {}).get("value")


def targets_met(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each target with its value and verdict.  An audit AUC far *below* 0.5 carries the source
    as much as one far above it (children scored higher instead of lower), so audits are judged
    on max(AUC, 1 - AUC)."""
    out = {}
    for name, (op, target) in TARGETS.items():
        value = _value(report, name)
        judged = value
        if value is not None and name.startswith("audit_"):
            judged = max(value, 1.0 - value)
        met = None if judged is None else (judged >= target if op == ">=" else judged <= target)
        out[name] = {"value": value, "target": f"{op} {target}", "met": met}
        if judged != value:
            out[name]["separation"] = judged
    return out


def _fmt_metric(block: dict[str, Any], name: str) -> str:
    v, ci = block[name]["value"], block[name]["ci95"]
    return fmt(v) + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def block_line(name: str, block: dict[str, Any]) -> str:
    parts = [f"{name:10s} n={block['n']:<5d}"]
    parts += [f"{m} {_fmt_metric(block, m)}" for m in METRICS]
    c = block["confusion"]
    parts.append(f"TP {c['tp']} FP {c['fp']} TN {c['tn']} FN {c['fn']}")
    return "  ".join(parts)


def report_lines(report: dict[str, Any]) -> list[str]:
    """The report for people: headline first."""
    lines = []
    if "adult" in report:
        lines.append(block_line("adult", report["adult"]) + "   <- headline")
    lines.append(block_line("mixed", report["mixed"]))
    lines += [block_line(s, b) for s, b in report["by_source"].items()]
    audit = report["audits"]
    lines.append(
        "audits (AUC among non-COVID films; 0.5 = the score carries no source): "
        + ", ".join(f"{k[6:]} {fmt(v)}" for k, v in audit.items())
    )
    cal = report["calibration"]
    lines.append(
        "calibration: "
        + ", ".join(f"{k} Brier {v['brier']} ECE {v['ece']}" for k, v in cal.items())
    )
    sk = report["skipped"]
    lines.append(f"skipped (not a frontal chest film): {sk['n']} {sk['by_source'] or ''}".rstrip())
    for name, t in report["targets"].items():
        verdict = {True: "met", False: "MISSED", None: "n/a"}[t["met"]]
        lines.append(f"target {name} {t['target']}: {fmt(t['value'])} {verdict}")
    return lines
