"""``cxr evaluate``: a model's metrics on any labelled folder of original images.

Files it cannot read are reported and counted, not fatal.  Intervals are 95% percentile
bootstraps, resampled by patient where the labels give one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ml.dataset import load_images, read_labels
from ml.metrics import roc_curve
from ml.report import report_lines as validation_lines
from ml.report import validation_report
from shared.imaging import DEFAULT_MAX_PIXELS
from shared.model_store import Classifier


class EvaluationError(ValueError):
    """The evaluation cannot give honest numbers (e.g. the labels list training patients)."""


def evaluate_folder(
    images: Path,
    labels: Path,
    model_path: Path,
    roc_path: Path | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    n_boot: int = 1000,
    validation_only: bool = False,
) -> dict[str, Any]:
    """Metrics of the model at ``model_path`` on a labelled folder.

    Images of patients the model was trained on are never scored as validation: with
    ``validation_only`` only the model's validation patients are kept, and otherwise any
    training patient in the labels is an error (no metric on training images).  Films the
    model's scope check refuses are counted as skipped, per source, like the workers skip them.
    """
    classifier = Classifier.load(model_path)
    threshold = classifier.info.threshold
    records = read_labels(labels)
    split = classifier.info.metadata.get("split", {})
    if validation_only:
        val_ids = set(split.get("val_patient_ids", []))
        if not val_ids:
            raise EvaluationError("the model's metadata lists no validation patients")
        records = [r for r in records if r.group in val_ids]
    trained_on = set(split.get("train_patient_ids", [])) & {r.patient for r in records if r.patient}
    if trained_on:
        raise EvaluationError(
            f"{len(trained_on)} patient(s) in {labels} were in this model's training data; "
            "metrics on them would not be a validation (use --validation-only, or other images)"
        )
    loaded = load_images(
        images, records, classifier.info.preprocess, max_pixels, segmenter=classifier.segmenter
    )
    probs = classifier.predict(loaded.x) if len(loaded.records) else np.zeros(0)
    report: dict[str, Any] = {
        "n": len(loaded.records),
        "n_listed": len(records),
        "unreadable": [{"file": f, "error": code} for f, code in loaded.unreadable],
        "skipped_files": [r.file for r in loaded.skipped],
        "model_version": classifier.info.version,
        "validation_only": validation_only,
    }
    report.update(validation_report(loaded.records, probs, threshold, n_boot, loaded.skipped))
    report["predictions"] = [
        {"file": r.file, "label": int(r.label), "probability": round(float(p), 6)}
        for r, p in zip(loaded.records, probs, strict=True)
    ]
    if roc_path is not None:
        auc = report["mixed"]["auc"]["value"]
        draw_roc(loaded.y, probs, auc, roc_path, classifier.info.version)
        report["roc_png"] = str(roc_path)
    return report


def draw_roc(y: np.ndarray, p: np.ndarray, auc: float | None, path: Path, title: str) -> None:
    """A plain ROC curve PNG drawn with OpenCV (no plotting library needed)."""
    size, margin = 520, 60
    canvas = np.full((size, size, 3), 255, np.uint8)
    x0, y0, x1, y1 = margin, size - margin, size - 20, 20
    cv2.rectangle(canvas, (x0, y1), (x1, y0), (0, 0, 0), 1)
    cv2.line(canvas, (x0, y0), (x1, y1), (180, 180, 180), 1, cv2.LINE_AA)
    for t in np.linspace(0, 1, 6):
        px = int(x0 + t * (x1 - x0))
        py = int(y0 - t * (y0 - y1))
        cv2.putText(
            canvas, f"{t:.1f}", (px - 12, y0 + 18), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1
        )
        cv2.putText(
            canvas, f"{t:.1f}", (x0 - 32, py + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1
        )
    cv2.putText(
        canvas,
        "false positive rate",
        (size // 2 - 70, size - 15),
        cv2.FONT_HERSHEY_SIMPLEX,
        0.5,
        (0, 0, 0),
        1,
    )
    cv2.putText(canvas, "TPR", (8, size // 2), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1)
    if len(set(np.asarray(y).tolist())) == 2:
        fpr, tpr = roc_curve(y, p)
        pts = np.stack([x0 + fpr * (x1 - x0), y0 - tpr * (y0 - y1)], axis=1).astype(np.int32)
        cv2.polylines(canvas, [pts], False, (200, 80, 0), 2, cv2.LINE_AA)
    label = f"AUC {auc:.3f}" if auc is not None else "AUC undefined (one class)"
    cv2.putText(canvas, label, (x0 + 200, y0 - 20), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (200, 80, 0), 2)
    cv2.putText(canvas, title[:60], (x0, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), canvas):
        raise OSError(f"cannot write {path}")


def report_lines(report: dict[str, Any]) -> list[str]:
    lines = [
        f"model {report['model_version']}  threshold {report['threshold']}",
        f"images: {report['n']} scored of {report['n_listed']} listed, "
        f"{report['skipped']['n']} skipped (not a frontal chest film), "
        f"{len(report['unreadable'])} unreadable",
    ]
    for u in report["unreadable"][:20]:
        lines.append(f"  unreadable: {u['file']} ({u['error']})")
    return lines + validation_lines(report)
