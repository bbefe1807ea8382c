"""``cxr evaluate`` end to end, with hand-set model weights so that every answer is known."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from cli.main import main
from shared.model_def import build_model
from shared.model_store import save_weights, write_metadata

METRIC_KEYS = ("accuracy", "sensitivity", "specificity", "auc")
CONSTANT_P = 1.0 / (1.0 + math.exp(-2.0))  # sigmoid(2) ~ 0.881


# --------------------------------------------------------------------------- models


@pytest.fixture(scope="module")
def keras_model() -> Any:
    return build_model(seed=0)


def _save(model: Any, weights: list[np.ndarray], path: Path, version: str) -> Path:
    model.set_weights(weights)
    digest = save_weights(model, path)
    write_metadata(path, {"version": version, "sha256": digest, "threshold": 0.5, "preprocess": {}})
    return path


def _zero_weights(model: Any) -> list[np.ndarray]:
    return [np.zeros_like(w) for w in model.get_weights()]


def constant_model(model: Any, path: Path) -> Path:
    """Every weight zero except the output bias: p = sigmoid(2) for every image."""
    weights = _zero_weights(model)
    weights[-1][:] = 2.0
    return _save(model, weights, path, "constant-test")


def brightness_model(model: Any, path: Path) -> Path:
    """p = sigmoid(10 * m - 5), m = mean of the thrice max-pooled image: monotone in brightness.

    Each conv layer passes channel 0 through unchanged (centre tap 1); the first Dense unit
    averages channel 0 of the 26x26x128 feature map; the output unit thresholds it at 0.5.
    """
    weights = _zero_weights(model)
    for kernel in (0, 2, 4):  # conv1, conv2, conv3 kernels: (3, 3, in, out)
        weights[kernel][1, 1, 0, 0] = 1.0
    dense = weights[6]  # (26 * 26 * 128, 64), channels-last flatten
    dense[0::128, 0] = 1.0 / (26 * 26)
    weights[8][0, 0] = 10.0  # output kernel
    weights[9][0] = -5.0  # output bias
    return _save(model, weights, path, "brightness-test")


# --------------------------------------------------------------------------- data


def _image(value: int, height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = value + rng.normal(0, 8, (height, width))
    return np.clip(img, 0, 255).astype(np.uint8)


def _encode(img: np.ndarray, ext: str) -> bytes:
    ok, buf = cv2.imencode(ext, img)
    assert ok
    return buf.tobytes()


# (file, label, source, patient, format, height, width); covid images bright, others dark
ROWS = [
    ("a1.png", "covid", "srcA", "pA1", "png8", 300, 260),
    ("a2.png", "covid", "srcA", "pA1", "png16", 256, 256),
    ("a3.jpg", "covid", "srcA", "pA2", "jpg", 480, 400),
    ("a4.bmp", "non-covid", "srcA", "pA3", "bmp", 224, 300),
    ("a5.png", "non-covid", "srcA", "pA4", "png16", 512, 380),
    ("a6.jpg", "non-covid", "srcA", "pA4", "jpg", 90, 120),
    ("b1.bmp", "covid", "srcB", "pB1", "bmp", 333, 250),
    ("b2.png", "non-covid", "srcB", "pB2", "png8", 1000, 40),
    ("b3.jpg", "non-covid", "srcB", "pB3", "jpg", 230, 230),
    ("c1.png", "non-covid", "srcC", "pC1", "png8", 260, 260),
    ("c2.jpg", "non-covid", "srcC", "pC2", "jpg", 300, 300),
]
BROKEN = ("broken.png", "covid", "srcA", "pA9")  # text named .png


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("images")
    for i, (name, label, _, _, fmt, height, width) in enumerate(ROWS):
        img = _image(200 if label == "covid" else 50, height, width, seed=i)
        if fmt == "png16":
            data = _encode(img.astype(np.uint16) * 257, ".png")
        elif fmt == "png8":
            data = _encode(img, ".png")
        elif fmt == "jpg":
            data = _encode(img, ".jpg")
        else:
            data = _encode(img, ".bmp")
        (folder / name).write_bytes(data)
    (folder / BROKEN[0]).write_text("this is not an image\n")
    labels = folder / "labels.csv"
    with open(labels, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file", "label", "source", "patient"])
        for name, label, source, patient, *_ in ROWS[:5]:
            writer.writerow([name, label, source, patient])
        writer.writerow(BROKEN)
        for name, label, source, patient, *_ in ROWS[5:]:
            writer.writerow([name, label, source, patient])
    return folder, labels


def _evaluate(folder: Path, labels: Path, model: Path, out: Path) -> dict[str, Any]:
    rc = main(
        [
            "evaluate",
            "--images",
            str(folder),
            "--labels",
            str(labels),
            "--json",
            str(out),
            "--model",
            str(model),
            "--bootstrap",
            "200",
        ]
    )
    assert rc == 0
    return json.loads(out.read_text())


def _check_block(block: dict[str, Any]) -> None:
    for key in METRIC_KEYS:
        assert set(block[key]) == {"value", "ci95"}, key
        value, ci = block[key]["value"], block[key]["ci95"]
        if value is None:
            assert ci is None
        else:
            assert ci is not None
            assert ci[0] <= value <= ci[1]


# --------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def constant_report(
    keras_model: Any, dataset: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("constant")
    model = constant_model(keras_model, work / "model.npz")
    return _evaluate(*dataset, model, work / "out" / "report.json")


def test_report_shape(constant_report: dict[str, Any]) -> None:
    r = constant_report
    assert r["model_version"] == "constant-test"
    assert r["threshold"] == 0.5
    assert r["n"] == len(ROWS)
    assert r["n_listed"] == len(ROWS) + 1
    for key in ("n", "threshold", "model_version", "mixed", "by_source", "unreadable", "skipped"):
        assert key in r
    assert r["skipped"] == {"n": 0, "by_source": {}}
    _check_block(r["mixed"])
    assert set(r["by_source"]) == {"srcA", "srcB", "srcC"}
    for source, block in r["by_source"].items():
        assert block["n"] == sum(row[2] == source for row in ROWS)
        _check_block(block)


def test_unreadable_file_is_counted_not_fatal(constant_report: dict[str, Any]) -> None:
    assert constant_report["unreadable"] == [{"file": "broken.png", "error": "not_an_image"}]
    files = [p["file"] for p in constant_report["predictions"]]
    assert "broken.png" not in files
    assert sorted(files) == sorted(row[0] for row in ROWS)
    assert constant_report["by_source"]["srcA"]["n"] == 6  # the broken srcA file is excluded


def test_constant_model_metrics(constant_report: dict[str, Any]) -> None:
    r = constant_report
    n_pos = sum(row[1] == "covid" for row in ROWS)
    for pred in r["predictions"]:
        assert pred["probability"] == pytest.approx(CONSTANT_P, abs=1e-5)
    assert r["mixed"]["accuracy"]["value"] == pytest.approx(n_pos / len(ROWS))
    assert r["mixed"]["sensitivity"] == {"value": 1.0, "ci95": [1.0, 1.0]}
    assert r["mixed"]["specificity"] == {"value": 0.0, "ci95": [0.0, 0.0]}
    assert r["mixed"]["auc"] == {"value": 0.5, "ci95": [0.5, 0.5]}
    assert r["mixed"]["confusion"] == {"tp": n_pos, "fp": len(ROWS) - n_pos, "tn": 0, "fn": 0}
    a = r["by_source"]["srcA"]
    assert a["accuracy"]["value"] == pytest.approx(3 / 6)
    assert a["auc"]["value"] == 0.5
    b = r["by_source"]["srcB"]
    assert b["accuracy"]["value"] == pytest.approx(1 / 3)


def test_one_class_source_has_no_auc(constant_report: dict[str, Any]) -> None:
    c = constant_report["by_source"]["srcC"]
    assert c["n"] == 2
    assert c["auc"] == {"value": None, "ci95": None}
    assert c["sensitivity"] == {"value": None, "ci95": None}
    assert c["specificity"]["value"] == 0.0
    assert c["accuracy"]["value"] == 0.0


def test_roc_png_is_written(constant_report: dict[str, Any]) -> None:
    roc = Path(constant_report["roc_png"])
    assert roc.name == "report.roc.png"
    assert roc.is_file()
    img = cv2.imread(str(roc))
    assert img is not None
    assert img.ndim == 3
    assert min(img.shape[:2]) >= 100


def test_brightness_model_separates_perfectly(
    keras_model: Any, dataset: tuple[Path, Path], tmp_path: Path
) -> None:
    model = brightness_model(keras_model, tmp_path / "model.npz")
    r = _evaluate(*dataset, model, tmp_path / "report.json")
    assert r["model_version"] == "brightness-test"
    assert r["n"] == len(ROWS)
    labels = {row[0]: row[1] for row in ROWS}
    for pred in r["predictions"]:
        if labels[pred["file"]] == "covid":
            assert pred["probability"] > 0.8, pred
        else:
            assert pred["probability"] < 0.2, pred
    for key in METRIC_KEYS:
        assert r["mixed"][key] == {"value": 1.0, "ci95": [1.0, 1.0]}, key
    assert r["by_source"]["srcA"]["auc"] == {"value": 1.0, "ci95": [1.0, 1.0]}
    assert r["by_source"]["srcC"]["auc"]["value"] is None
    assert r["mixed"]["confusion"]["fp"] == r["mixed"]["confusion"]["fn"] == 0
    assert (tmp_path / "report.roc.png").is_file()


def _model_with_split(keras_model: Any, path: Path, train: list[str], val: list[str]) -> Path:
    constant_model(keras_model, path)
    meta = json.loads(path.with_suffix(".json").read_text())
    meta["split"] = {"train_patient_ids": train, "val_patient_ids": val}
    path.with_suffix(".json").write_text(json.dumps(meta))
    return path


def test_training_patients_are_refused(
    keras_model: Any, dataset: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder, labels = dataset
    patients = sorted({row[3] for row in ROWS})
    model = _model_with_split(keras_model, tmp_path / "m.npz", patients[:1], patients[1:])
    argv = [
        "evaluate",
        "--images",
        str(folder),
        "--labels",
        str(labels),
        "--model",
        str(model),
        "--bootstrap",
        "50",
        "--json",
        str(tmp_path / "r.json"),
    ]
    assert main(argv) == 2
    assert "training data" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()
    assert main([*argv, "--validation-only"]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    kept = [row for row in ROWS if row[3] in patients[1:]]
    assert report["n"] == len(kept)
    assert report["validation_only"] is True


def test_out_of_scope_films_are_counted_as_skipped_per_source(
    keras_model: Any, tmp_path: Path
) -> None:
    """A model that crops to the lung fields skips what has none, and says how many, by source."""
    import shutil

    from ml.synthetic import generate
    from shared.lungs import DEFAULT_SEGMENTER_PATH
    from tests.factories import xray_like

    folder = tmp_path / "films"
    folder.mkdir()
    rows = []
    for i in range(4):
        cv2.imwrite(str(folder / f"f{i}.png"), xray_like(i))
        rows.append((f"f{i}.png", ("covid", "non-covid")[i % 2], "ieee8023", f"p{i}"))
    cv2.imwrite(str(folder / "doc.png"), generate("document", 0))
    rows.append(("doc.png", "non-covid", "nih", "p9"))
    labels = folder / "labels.csv"
    with open(labels, "w", newline="") as fh:
        csv.writer(fh).writerows([("file", "label", "source", "patient"), *rows])
    model = constant_model(keras_model, tmp_path / "m" / "model.npz")
    for suffix in (".npz", ".json"):
        shutil.copyfile(DEFAULT_SEGMENTER_PATH.with_suffix(suffix), model.parent / f"lungs{suffix}")
    meta = json.loads(model.with_suffix(".json").read_text())
    seg_meta = json.loads(DEFAULT_SEGMENTER_PATH.with_suffix(".json").read_text())
    meta["preprocess"] = {"lung_crop": True}
    meta["segmenter"] = {"file": "lungs.npz", "sha256": seg_meta["sha256"]}
    model.with_suffix(".json").write_text(json.dumps(meta))
    r = _evaluate(folder, labels, model, tmp_path / "r.json")
    assert r["skipped"] == {"n": 1, "by_source": {"nih": 1}}
    assert r["skipped_files"] == ["doc.png"]
    assert r["n"] == 4
    assert r["adult"]["n"] == 4
