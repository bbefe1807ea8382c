"""``cxr audit-scope``: how often the scope decision skips frontal films and scores the rest.

Invariant: the decision measured is exactly the workers' (decode, segmenter and scope net,
:func:`shared.lungs.decide` at the model's margin); frontal films come from a labelled folder,
out-of-scope ones from a folder with a ``manifest.csv`` holding a ``kind`` column, plus
generated non-chest images (:mod:`ml.synthetic`, with seeds no network trained on).
Out-of-scope patients whose films taught the segmenter "no lungs here" (listed in its metadata)
are reported apart and kept out of the totals.  Targets: frontal films skipped <= 1%,
out-of-scope films scored <= 10%.

The bundled scope net learnt from these very films, so this audit grades it on its own
training data (the report says so); ``cxr audit-scope --folds 5`` (:func:`ml.scope_net.audit_folds`)
is the honest one: a net per fold of patients, every film decided by a net that never saw it.
"""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path
from typing import Any

from ml.synthetic import KINDS, generate
from shared.imaging import ImageError, decode_grayscale
from shared.lungs import SCORED_REASONS, LungSegmenter

MAX_FRONTAL_SKIPPED = 0.01
MAX_OUT_OF_SCOPE_SCORED = 0.10


def _decisions(segmenter: LungSegmenter, grays: list[Any]) -> list[str]:
    """The decision's reason for each grayscale image (SCORED_REASONS: it is scored)."""
    out: list[str] = []
    for i in range(0, len(grays), 32):  # batched, as the workers run it
        out += [f.reason for f in segmenter.find_many(grays[i : i + 32])]
    return out


def _read(folder: Path, names: list[str]) -> list[Any]:
    out = []
    for name in names:
        try:
            out.append(decode_grayscale((folder / name).read_bytes()))
        except (OSError, ImageError):
            continue  # unreadable is not a scope question
    return out


def _manifest(folder: Path) -> list[dict[str, str]]:
    with open(folder / "manifest.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _rate(reasons: list[str], want_ok: bool) -> dict[str, Any]:
    """Wrong: a frontal film skipped as not frontal, or another image scored.  A frontal film
    refused as a child's ("pediatric") is counted apart: it is frontal, and not scored."""
    n = len(reasons)
    wrong = sum(
        (r in SCORED_REASONS) != want_ok for r in reasons if not (want_ok and r == "pediatric")
    )
    return {
        "n": n,
        "wrong": wrong,
        "rate": round(wrong / n, 4) if n else None,
        "pediatric": sum(r == "pediatric" for r in reasons),
        "reasons": dict(sorted(Counter(reasons).items())),
    }


def audit_scope(
    segmenter: LungSegmenter,
    frontal: Path | None,
    scope: Path | None,
    generated_per_kind: int = 20,
) -> dict[str, Any]:
    report: dict[str, Any] = {
        "segmenter": segmenter.version,
        "scope_net": segmenter.scope_version,
        # its thresholds and weights were chosen on these films: see --folds
        "graded_on_training_films": segmenter.scope_version is not None,
    }

    def rates(folder: Path, groups: dict[str, list[str]], want_ok: bool) -> dict[str, Any]:
        return {
            name: _rate(_decisions(segmenter, _read(folder, files)), want_ok)
            for name, files in sorted(groups.items())
        }

    if frontal is not None:
        by_source: dict[str, list[str]] = {}
        for row in _manifest(frontal):
            by_source.setdefault(row.get("source", "") or "-", []).append(row["file"])
        report["frontal"] = rates(frontal, by_source, want_ok=True)
    if scope is not None:
        negatives = segmenter.metadata.get("training", {}).get("negatives", {})
        seen = set(negatives.get("scope_patients", []))
        kinds: dict[str, list[str]] = {}
        trained: dict[str, list[str]] = {}
        for row in _manifest(scope):
            group = row.get("patient") or f"file:{row['file']}"  # as Record.group names it
            into = trained if group in seen else kinds
            into.setdefault(row["kind"], []).append(row["file"])
        report["out_of_scope"] = rates(scope, kinds, want_ok=False)
        report["seen_in_training"] = rates(scope, trained, want_ok=False)
    generated = {
        kind: _rate(
            _decisions(
                segmenter,
                [
                    generate(kind, seed).astype("float32") / 255.0
                    for seed in range(generated_per_kind)
                ],
            ),
            want_ok=False,
        )
        for kind in KINDS  # seeds 0..n; the segmenter trained on seeds from 10,000
    }
    report.setdefault("out_of_scope", {}).update(
        {f"generated:{k}": v for k, v in generated.items()}
    )
    report["totals"] = _totals(report)
    return report


def _totals(report: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, limit in (("frontal", MAX_FRONTAL_SKIPPED), ("out_of_scope", MAX_OUT_OF_SCOPE_SCORED)):
        blocks = report.get(key, {}).values()
        n = sum(b["n"] for b in blocks)
        wrong = sum(b["wrong"] for b in blocks)
        rate = wrong / n if n else None
        out[key] = {
            "n": n,
            "wrong": wrong,
            "rate": None if rate is None else round(rate, 4),
            "target": f"<= {limit}",
            "met": None if rate is None else rate <= limit,
        }
    return out


def scope_lines(report: dict[str, Any]) -> list[str]:
    lines = [f"segmenter {report['segmenter']}, scope net {report.get('scope_net')}"]
    if report.get("graded_on_training_films"):
        lines.append("  (the scope net learnt from these films: cxr audit-scope --folds 5 is fair)")
    for name, b in report.get("seen_in_training", {}).items():
        lines.append(f"  (trained on) {name:24s} n={b['n']:<5d} scored {b['wrong']}")
    for key, verb in (("frontal", "skipped"), ("out_of_scope", "scored")):
        for name, b in report.get(key, {}).items():
            lines.append(
                f"  {key:12s} {name:24s} n={b['n']:<5d} {verb} {b['wrong']}  {b['reasons']}"
            )
        t = report["totals"][key]
        verdict = {True: "met", False: "MISSED", None: "n/a"}[t["met"]]
        lines.append(
            f"{key}: {t['wrong']} of {t['n']} {verb} ({t['rate']}), target {t['target']} {verdict}"
        )
    return lines
