"""`cxr train`: patient-level splits and short real training runs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from cli.main import main
from ml.dataset import Record, patient_split, read_labels
from ml.train import sample_weights
from shared.model_store import Classifier, read_model_info, sha256_file
from tests.factories import xray_like


def write_folder(folder: Path, n_patients: int = 12, per_patient: int = 2) -> None:
    """Generated films: 'covid' ones carry a bright blotch in the lungs, so there is signal."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for p in range(n_patients):
        label = "covid" if p % 2 else "non-covid"
        source = ("siteA", "siteB")[p % 3 == 0]
        for k in range(per_patient):
            img = xray_like(p * 10 + k, height=180, width=160)
            if label == "covid":
                cv2.circle(img, (50, 90), 25, 230, -1)
            name = f"p{p}-{k}.png"
            cv2.imwrite(str(folder / name), img)
            rows.append({"file": name, "label": label, "source": source, "patient": f"pt{p}"})
    with open(folder / "manifest.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["file", "label", "source", "patient"])
        writer.writeheader()
        writer.writerows(rows)


def test_patient_split_keeps_patients_whole_and_is_reproducible() -> None:
    records = [
        Record(f"{p}-{k}.png", p % 2, ("a", "b")[p % 3 == 0], f"pt{p}")
        for p in range(50)
        for k in range(1 + p % 3)
    ]
    train, val = patient_split(records, 0.2, seed=7)
    assert not {r.patient for r in train} & {r.patient for r in val}
    assert len(train) + len(val) == len(records)
    assert 0.15 <= len(val) / len(records) <= 0.3
    assert {r.label for r in val} == {0, 1}
    _, again_val = patient_split(records, 0.2, seed=7)
    assert [r.file for r in again_val] == [r.file for r in val]
    _, other_val = patient_split(records, 0.2, seed=8)
    assert [r.file for r in other_val] != [r.file for r in val]


def test_robust_weights_give_fixed_shares() -> None:
    records = (
        [Record(f"c{i}", 1, "ieee8023", f"c{i}") for i in range(30)]
        + [Record(f"a{i}", 0, "ieee8023", f"a{i}") for i in range(5)]
        + [Record(f"k{i}", 0, "kermany", f"k{i}") for i in range(65)]
    )
    w = sample_weights(records, "groups")
    assert w.mean() == pytest.approx(1.0)
    share = {
        "covid": w[:30].sum() / w.sum(),
        "adult": w[30:35].sum() / w.sum(),
        "pediatric": w[35:].sum() / w.sum(),
    }
    assert share == pytest.approx({"covid": 0.5, "adult": 0.3, "pediatric": 0.2})
    paper = sample_weights(records, "classes")
    assert paper[:30].sum() == pytest.approx(paper[30:].sum())


def test_tiny_training_run_writes_a_loadable_model(tmp_path: Path, capsys) -> None:
    data = tmp_path / "data"
    write_folder(data)
    out = tmp_path / "model" / "m.npz"
    argv = [
        "train",
        "--data",
        str(data),
        "--out",
        str(out),
        "--epochs",
        "2",
        "--quiet",
        "--recipe",
        "robust",
    ]
    assert main(argv) == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["sha256"] == sha256_file(out)
    assert meta["version"].startswith("cxr-cnn-robust-")
    assert meta["split"]["val_images"] > 0
    split = meta["split"]
    assert split["train_images"] + split["early_stopping_images"] + split["val_images"] == 24
    assert meta["preprocess"] == {"crop_fraction": 0.08, "clahe": True}
    assert len(meta["training_data"]["fingerprint"]) == 64
    for key in ("accuracy", "sensitivity", "specificity", "auc"):
        assert set(meta["validation"]["overall"][key]) == {"value", "ci95"}
    val_patients = set(meta["split"]["val_patient_ids"])
    train_files = {r.patient for r in read_labels(data / "manifest.csv")} - val_patients
    assert train_files
    assert val_patients
    info = read_model_info(out)
    assert info.threshold == 0.5
    probs = Classifier(info).predict(np.zeros((2, 224, 224, 3), np.float32))
    assert probs.shape == (2,)
    assert "wrote" in capsys.readouterr().out


@pytest.mark.realdata
def test_short_training_run_on_real_xrays(real_data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "real.npz"
    argv = [
        "train",
        "--data",
        str(real_data_dir),
        "--out",
        str(out),
        "--epochs",
        "1",
        "--max-images",
        "80",
        "--quiet",
        "--recipe",
        "paper",
    ]
    assert main(argv) == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["training_data"]["images"] <= 100
    assert meta["split"]["train_patients"] > 0
    assert meta["validation"]["overall"]["n"] == meta["split"]["val_images"]
    assert "by_source" in meta["validation"]
