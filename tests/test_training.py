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
from ml.train import GROUP_SHARES, TrainOptions, sample_weights, split
from shared.model_store import Classifier, read_model_info, sha256_file
from tests.factories import xray_like

SOURCES = ("ieee8023", "nih", "kermany")


def write_folder(folder: Path, n_patients: int = 12, per_patient: int = 2) -> None:
    """Generated films: 'covid' ones carry a bright blotch in the lungs, so there is signal."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for p in range(n_patients):
        label = "covid" if p % 2 else "non-covid"
        source = "ieee8023" if label == "covid" else SOURCES[p % 3]
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


def test_group_weights_give_fixed_shares() -> None:
    records = (
        [Record(f"c{i}", 1, "ieee8023", f"c{i}") for i in range(30)]
        + [Record(f"a{i}", 0, "ieee8023", f"a{i}") for i in range(5)]
        + [Record(f"n{i}", 0, "nih", f"n{i}") for i in range(40)]
        + [Record(f"k{i}", 0, "kermany", f"k{i}") for i in range(65)]
    )
    w = sample_weights(records, GROUP_SHARES)
    assert w.mean() == pytest.approx(1.0)
    share = {
        "covid": w[:30].sum() / w.sum(),
        "same-source": w[30:35].sum() / w.sum(),
        "nih": w[35:75].sum() / w.sum(),
        "pediatric": w[75:].sum() / w.sum(),
    }
    assert share == pytest.approx({"covid": 0.5, "same-source": 0.2, "nih": 0.2, "pediatric": 0.1})
    paper = sample_weights(records, None)
    assert paper[:30].sum() == pytest.approx(paper[30:].sum())


def test_held_out_source_is_validation_only(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_folder(data, n_patients=30, per_patient=1)
    splits = split(TrainOptions(data=data, out=tmp_path / "m.npz", hold_out_source="nih"))
    nih = {r.file for r in read_labels(data / "manifest.csv") if r.source == "nih"}
    assert nih
    assert nih <= {r.file for r in splits.val}
    assert not nih & {r.file for r in splits.fit + splits.stop}


def _train_argv(data: Path, out: Path, cache: Path) -> list[str]:
    return [
        "train",
        "--data",
        str(data),
        "--out",
        str(out),
        "--epochs",
        "2",
        "--warmup-epochs",
        "0",
        "--quiet",
        "--recipe",
        "lungs",
        "--monitor",
        "loss",
        "--cache-dir",
        str(cache),
        "--bootstrap",
        "50",
    ]


def test_tiny_training_run_writes_a_loadable_model(tmp_path: Path, capsys) -> None:
    data = tmp_path / "data"
    write_folder(data, n_patients=24)
    out = tmp_path / "model" / "m.npz"
    assert main(_train_argv(data, out, tmp_path / "cache")) == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["sha256"] == sha256_file(out)
    assert meta["version"].startswith("cxr-cnn-lungs-")
    split_meta = meta["split"]
    assert split_meta["val_images"] > 0
    skipped = sum(split_meta["skipped_images"].values())
    total = split_meta["train_images"] + split_meta["early_stopping_images"]
    assert total + split_meta["val_images"] + skipped == 48
    assert meta["preprocess"]["lung_crop"] is True
    assert meta["segmenter"]["sha256"] == sha256_file(out.parent / meta["segmenter"]["file"])
    assert len(meta["training_data"]["fingerprint"]) == 64
    for key in ("accuracy", "sensitivity", "specificity", "auc"):
        assert set(meta["validation"]["mixed"][key]) == {"value", "ci95"}
    assert set(meta["validation"]["audits"]) == {
        "audit_adult_vs_pediatric",
        "audit_nih_vs_same_source",
    }
    val_patients = set(meta["split"]["val_patient_ids"])
    assert val_patients
    assert not val_patients & set(meta["split"]["train_patient_ids"])
    info = read_model_info(out)
    clf = Classifier(info)
    assert clf.segmenter is not None
    probs = clf.predict(np.zeros((2, 224, 224, 3), np.float32))
    assert probs.shape == (2,)
    assert "wrote" in capsys.readouterr().out


def test_training_is_deterministic_and_the_cache_changes_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_folder(data, n_patients=12)
    cache = tmp_path / "cache"
    first, second = tmp_path / "a" / "m.npz", tmp_path / "b" / "m.npz"
    assert main(_train_argv(data, first, cache)) == 0
    cached = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    assert len(cached) == 24  # one entry per film (an array, or the reason it was refused)
    assert main(_train_argv(data, second, cache)) == 0
    # every film was read from the cache: a miss would have written its entry again
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == cached
    assert sha256_file(first) == sha256_file(second)
    a = json.loads(first.with_suffix(".json").read_text())
    b = json.loads(second.with_suffix(".json").read_text())
    assert a["validation"] == b["validation"]
    assert a["threshold"] == b["threshold"]


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
        "lungs",
        "--no-cache",
    ]
    assert main(argv) == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["training_data"]["images"] <= 100
    assert meta["split"]["train_patients"] > 0
    assert meta["validation"]["mixed"]["n"] == meta["split"]["val_images"]
    assert "by_source" in meta["validation"]
    assert "adult" in meta["validation"]
