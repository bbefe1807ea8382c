"""Cross-validation: the fold split, the ship rule on known inputs, gradient reversal, and a
short `cxr cv` run on generated films that writes out-of-fold predictions for every film."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from ml.dataset import Record, read_labels
from ml.folds import kfold, leave_source_out, patient_folds
from ml.shiprule import rule_point, rule_with_intervals, spread


def _records(n_patients: int = 300, seed: int = 0) -> list[Record]:
    """Patients with 1-3 films each over four sources, labels as in the real data's shape."""
    rng = np.random.default_rng(seed)
    out = []
    for p in range(n_patients):
        source = ("ieee8023", "nih", "kermany", "actualmed")[p % 4]
        label = int(source in ("ieee8023", "actualmed") and rng.random() < 0.7)
        for k in range(1 + p % 3):
            out.append(Record(f"p{p}-{k}.png", label, source, f"pt{p}"))
    return out


def test_folds_keep_every_patient_on_one_side() -> None:
    records = _records()
    fold = patient_folds(records, k=5, seed=3)
    by_patient: dict[str, set[int]] = {}
    for r, f in zip(records, fold, strict=True):
        by_patient.setdefault(r.patient, set()).add(int(f))
    assert all(len(folds) == 1 for folds in by_patient.values())


def test_folds_cover_every_film_exactly_once() -> None:
    records = _records()
    folds = kfold(records, k=5, seed=3)
    tested = np.concatenate([f.test for f in folds])
    assert sorted(tested.tolist()) == list(range(len(records)))
    for f in folds:
        assert not set(f.train.tolist()) & set(f.test.tolist())


def test_folds_keep_each_stratum_share() -> None:
    records = _records(600)
    fold = patient_folds(records, k=5, seed=1)
    total = Counter((r.source, r.label) for r in records)
    for i in range(5):
        inside = Counter((r.source, r.label) for r, f in zip(records, fold, strict=True) if f == i)
        for key, n in total.items():
            assert inside[key] / n == pytest.approx(0.2, abs=0.06), (i, key)


def test_folds_are_reproducible_and_depend_on_the_seed() -> None:
    records = _records()
    assert (patient_folds(records, 5, 7) == patient_folds(records, 5, 7)).all()
    assert (patient_folds(records, 5, 7) != patient_folds(records, 5, 8)).any()


def test_leave_source_out_tests_all_of_it_and_trains_on_none_of_it() -> None:
    records = _records()
    fold = leave_source_out(records, "actualmed")
    assert {records[i].source for i in fold.test} == {"actualmed"}
    assert len(fold.test) == sum(r.source == "actualmed" for r in records)
    assert "actualmed" not in {records[i].source for i in fold.train}


def _known() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """20 same-source COVID-19 films scored 0.05..1.0; same-source negatives at 0.1..0.8 and NIH
    negatives at 0.02..0.4: the rule's numbers can be counted by hand."""
    pos = np.linspace(0.05, 1.0, 20)
    same_neg = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    nih_neg = np.linspace(0.02, 0.4, 10)
    p = np.r_[pos, same_neg, nih_neg]
    y = np.r_[np.ones(20), np.zeros(18)].astype(int)
    src = np.array(["ieee8023"] * 28 + ["nih"] * 10)
    return y, p, src


def test_ship_rule_threshold_and_specificities_on_known_inputs() -> None:
    y, p, src = _known()
    out = rule_point(y, p, src, sensitivity=0.85)
    # 17 of 20 positives (0.85) lie at or above the 4th lowest positive score, 0.2
    assert out["threshold"] == pytest.approx(0.2)
    assert out["sensitivity"] == pytest.approx(0.85)
    assert out["same_source_specificity"] == pytest.approx(1 / 8)  # only 0.1 is below 0.2
    assert out["nih_specificity"] == pytest.approx(5 / 10)  # 0.02..0.18 are below 0.2
    assert out["score"] == pytest.approx((1 / 8 + 5 / 10) / 2)


def test_ship_rule_scores_a_perfect_ranking_one_and_a_reversed_one_zero() -> None:
    y = np.r_[np.ones(10), np.zeros(10), np.zeros(10)].astype(int)
    src = np.array(["ieee8023"] * 20 + ["nih"] * 10)
    good = np.r_[np.linspace(0.6, 1, 10), np.linspace(0, 0.4, 20)]
    assert rule_point(y, good, src)["score"] == pytest.approx(1.0)
    assert rule_point(y, good, src)["adult_auc"] == pytest.approx(1.0)
    assert rule_point(y, 1 - good, src)["score"] == pytest.approx(0.0)


def test_ship_rule_intervals_contain_the_value_and_resample_patients() -> None:
    y, p, src = _known()
    groups = [f"g{i}" for i in range(len(y))]
    out = rule_with_intervals(y, p, src, groups, n_boot=200)
    lo, hi = out["score"]["ci95"]
    assert lo <= out["score"]["value"] <= hi
    assert hi - lo > 0.05  # 38 films: the interval is wide, and it says so
    # one patient holding every film: every resample is the same data, the interval collapses
    same = rule_with_intervals(y, p, src, ["one"] * len(y), n_boot=50)
    assert same["score"]["ci95"][0] == same["score"]["ci95"][1]


def test_spread_over_folds() -> None:
    folds = [{"score": 0.2}, {"score": 0.4}, {"score": None}, {"score": 0.6}]
    s = spread(folds, "score")
    assert s == {"mean": 0.4, "sd": 0.2, "min": 0.2, "max": 0.6, "n": 3}


def test_gradient_reversal_negates_the_gradient() -> None:
    import tensorflow as tf

    from ml.adversarial import GradientReversal

    x = tf.Variable(np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32))
    w = tf.constant(np.random.default_rng(1).normal(size=(4, 6)).astype(np.float32))
    layer = GradientReversal(scale=1.0)
    with tf.GradientTape(persistent=True) as tape:
        forward = layer(x)
        plain = tf.reduce_sum(w * x)
        reversed_ = tf.reduce_sum(w * forward)
    np.testing.assert_array_equal(forward.numpy(), x.numpy())  # identity forward
    np.testing.assert_allclose(tape.gradient(reversed_, x), -tape.gradient(plain, x))
    half = GradientReversal(scale=0.5)
    with tf.GradientTape() as tape2:
        out = tf.reduce_sum(w * half(x))
    np.testing.assert_allclose(tape2.gradient(out, x), -0.5 * w.numpy())


def test_adversarial_training_keeps_a_plain_classifier(tmp_path: Path) -> None:
    """The adversarial recipe's heads are training-only: what fit returns is the Sequential
    network of the recipe's architecture, loadable by the service like any other."""
    from ml.dataset import LoadedSet
    from ml.train import RECIPES, Schedule, TrainOptions, fit
    from shared.model_def import build

    rng = np.random.default_rng(0)
    recs = [
        Record(f"f{i}", i % 2, ("ieee8023", "nih")[i % 4 == 0] if i % 2 == 0 else "ieee8023")
        for i in range(24)
    ]
    x = rng.random((24, 224, 224, 3)).astype(np.float32)
    opts = TrainOptions(
        data=tmp_path, out=tmp_path / "m.npz", schedule=Schedule(1, 1, 0, "loss"), progress=False
    )
    recipe = RECIPES["small-adult-adversarial"]
    model, history, _ = fit(opts, recipe, LoadedSet(recs, x), LoadedSet(recs[:8], x[:8]))
    assert "source_loss" in history
    assert [w.shape for w in model.get_weights()] == [
        w.shape for w in build(recipe.architecture).get_weights()
    ]


@pytest.mark.realdata
def test_folds_of_the_real_manifest_keep_patients_and_strata(real_data_dir: Path) -> None:
    records = read_labels(real_data_dir / "manifest.csv")
    folds = kfold(records, k=5, seed=42)
    seen: dict[str, int] = {}
    for i, f in enumerate(folds):
        for j in f.test:
            assert seen.setdefault(records[j].group, i) == i
    total = Counter((r.source, r.label) for r in records)
    for f in folds:
        inside = Counter((records[j].source, records[j].label) for j in f.test)
        for key, n in total.items():
            assert inside[key] / n == pytest.approx(0.2, abs=0.1), key


def test_cv_command_writes_out_of_fold_predictions_for_every_film(tmp_path: Path) -> None:
    from cli.main import main
    from tests.test_training import write_folder

    data = tmp_path / "data"
    write_folder(data, n_patients=18, per_patient=2)
    out = tmp_path / "cv"
    code = main(
        [
            "cv",
            "--data",
            str(data),
            "--recipe",
            "paper",
            "--folds",
            "3",
            "--epochs",
            "1",
            "--warmup-epochs",
            "0",
            "--patience",
            "1",
            "--monitor",
            "loss",
            "--bootstrap",
            "20",
            "--hold-out-source",
            "",
            "--no-cache",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0
    report = json.loads((out / "paper.json").read_text())
    files = (out / "paper.oof.csv").read_text().splitlines()[1:]
    assert len(files) == 36  # every film, once
    assert len({line.split(",")[0] for line in files}) == 36
    assert len(report["per_fold"]) == 3
    assert set(report["spread"]["score"]) == {"mean", "sd", "min", "max", "n"}


def test_train_calibrates_on_the_out_of_fold_predictions(tmp_path: Path) -> None:
    """`cxr train --cv-dir` fits Platt scaling and the threshold on `cxr cv`'s out-of-fold
    table, records the cross-validation in the metadata, and the small network it trains is
    served by the same Classifier as the paper's."""
    from cli.main import main
    from shared.model_store import Classifier, read_model_info
    from tests.test_training import write_folder

    data = tmp_path / "data"
    write_folder(data, n_patients=18, per_patient=2)
    quick = ["--epochs", "1", "--warmup-epochs", "0", "--patience", "1", "--no-cache", "--quiet"]
    cv = tmp_path / "cv"
    cv_args = ["cv", "--data", str(data), "--recipe", "small-adult", "--folds", "2"]
    cv_args += ["--hold-out-source", "", "--bootstrap", "10", "--out", str(cv), *quick]
    assert main(cv_args) == 0
    out = tmp_path / "model" / "m.npz"
    train_args = ["train", "--data", str(data), "--out", str(out), "--recipe", "small-adult"]
    train_args += ["--cv-dir", str(cv), "--bootstrap", "10", *quick]
    assert main(train_args) == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    assert "out-of-fold" in meta["calibration"]["fitted_on"]
    assert meta["cross_validation"]["folds"] == 2
    assert meta["architecture"] == "small-gap-bn"
    clf = Classifier(read_model_info(out))
    assert clf.predict(np.zeros((3, 224, 224, 3), np.float32)).shape == (3,)


@pytest.mark.parametrize("recipe", ["small-adult", "small-adult-acquisition"])
def test_small_network_training_is_deterministic(tmp_path: Path, recipe: str) -> None:
    """Two runs of a recipe with batch norm, dropout and the acquisition augmentations (JPEG,
    noise, erasing: stateless random ops) write the same bytes."""
    from cli.main import main
    from shared.model_store import sha256_file
    from tests.test_training import write_folder

    data = tmp_path / "data"
    write_folder(data, n_patients=12)
    outs = [tmp_path / name / "m.npz" for name in ("a", "b")]
    for out in outs:
        argv = ["train", "--data", str(data), "--out", str(out), "--recipe", recipe]
        argv += ["--epochs", "2", "--warmup-epochs", "0", "--monitor", "loss", "--quiet"]
        argv += ["--no-cache", "--bootstrap", "10"]
        assert main(argv) == 0
    assert sha256_file(outs[0]) == sha256_file(outs[1])


def test_paired_difference_is_zero_for_the_same_recipe_and_positive_for_a_better_one() -> None:
    from ml.shiprule import paired_difference

    y, p, src = _known()
    groups = [f"g{i}" for i in range(len(y))]
    same = paired_difference(y, p, p, src, groups, n_boot=100)
    assert same["score"] == {"value": 0.0, "ci95": [0.0, 0.0]}
    better = np.where(y == 1, 0.5 + p / 2, p / 2)  # every positive above every negative
    up = paired_difference(y, p, better, src, groups, n_boot=100)
    assert up["score"]["value"] > 0
    assert up["score"]["ci95"][0] > 0
