"""Cross-validation folds split by patient, stratified by (source, label).

Invariant: no patient is ever on two sides.  :func:`patient_folds` gives every film exactly one
fold (scikit-learn's ``StratifiedGroupKFold``: groups are patients, strata are
``source|label``), so that out-of-fold predictions exist for every film and each fold holds
about 1/K of every stratum.  :func:`leave_source_out` holds a whole source out: the closest thing
in the data to a hospital the model never saw.  Early stopping and calibration patients are
carved out of a fold's *training* patients (:func:`ml.dataset.patient_split`), never out of its
held-out films.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from ml.dataset import Record


@dataclass(frozen=True)
class Fold:
    """One fold: indices into the record list (training patients, held-out patients)."""

    name: str
    train: np.ndarray
    test: np.ndarray


def strata(records: Sequence[Record]) -> list[str]:
    return [f"{r.source}|{r.label}" for r in records]


def patient_folds(records: Sequence[Record], k: int = 5, seed: int = 42) -> np.ndarray:
    """The fold (0..k-1) of each record; every record in exactly one, patients never split."""
    if k < 2:
        raise ValueError("cross-validation needs at least 2 folds")
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    fold = np.full(len(records), -1, int)
    groups = [r.group for r in records]
    for i, (_, test) in enumerate(splitter.split(np.zeros(len(records)), strata(records), groups)):
        fold[test] = i
    if (fold < 0).any():  # StratifiedGroupKFold covers every sample; a guard, not a path
        raise RuntimeError("a film was left out of every fold")
    return fold


def kfold(records: Sequence[Record], k: int = 5, seed: int = 42) -> list[Fold]:
    fold = patient_folds(records, k, seed)
    return [
        Fold(f"fold{i + 1}", np.flatnonzero(fold != i), np.flatnonzero(fold == i)) for i in range(k)
    ]


def leave_source_out(records: Sequence[Record], source: str) -> Fold:
    """Train on every other source, test on all of ``source``; a patient of both is dropped
    from training (patients are unique across sources here, but the rule must hold anyway)."""
    test = np.array([i for i, r in enumerate(records) if r.source == source], int)
    if not len(test):
        raise ValueError(f"no films of source {source!r} to hold out")
    held = {records[i].group for i in test}
    train = np.array(
        [i for i, r in enumerate(records) if r.source != source and r.group not in held], int
    )
    return Fold(f"without-{source}", train, test)
