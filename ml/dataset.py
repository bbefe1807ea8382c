"""Labelled image folders: manifest/labels CSVs, patient-level splits, image loading.

Images are loaded through the one preprocessing path (:func:`shared.imaging.preprocess`), the
segmenter included, so a film the workers would skip is skipped here too (and counted, never
silently dropped).  Preprocessed arrays may be cached on disk, keyed by the sha256 of each
file's bytes, the preprocessing config and the segmenter's sha256: a cache hit is exactly what
the preprocessing would have produced.
"""

from __future__ import annotations

import csv
import hashlib
import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from shared import dicom, imaging, lungs
from shared.imaging import (
    DEFAULT_MAX_PIXELS,
    OUT_OF_SCOPE_CODES,
    ImageError,
    PreprocessConfig,
    preprocess,
)
from shared.lungs import LungSegmenter

LABELS = {"covid": 1, "non-covid": 0}
#: Adult films with both classes from the same collections: the headline question.
SAME_SOURCE_ADULT = ("ieee8023", "actualmed")
#: Adult non-COVID films from one other hospital (NIH), all taken before COVID-19.
NIH_SOURCE = "nih"
ADULT_SOURCES = (*SAME_SOURCE_ADULT, NIH_SOURCE)
PEDIATRIC_SOURCES = ("kermany",)


class LabelsFileError(ValueError):
    """The labels/manifest CSV is missing required columns or holds unknown labels."""


@dataclass(frozen=True)
class Record:
    file: str
    label: int
    source: str = ""
    patient: str = ""

    @property
    def group(self) -> str:
        """The bootstrap/split unit: the patient where known, else the file itself."""
        return self.patient or f"file:{self.file}"


@dataclass
class LoadedSet:
    records: list[Record]
    x: np.ndarray  # (n, 224, 224, 3) float32
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (file, error code)
    skipped: list[Record] = field(default_factory=list)  # not frontal chest films (out of scope)

    @property
    def y(self) -> np.ndarray:
        return np.array([r.label for r in self.records], np.int32)


def read_labels(csv_path: Path) -> list[Record]:
    """Rows of a CSV with columns ``file,label`` and optional ``source``, ``patient``."""
    with open(csv_path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        cols = set(reader.fieldnames or [])
        if not {"file", "label"} <= cols:
            raise LabelsFileError(
                f"{csv_path} needs columns 'file' and 'label', has {sorted(cols)}"
            )
        records = []
        for line, row in enumerate(reader, start=2):
            label = (row.get("label") or "").strip().lower()
            if label not in LABELS:
                raise LabelsFileError(
                    f"{csv_path}:{line}: label {label!r} is not 'covid' or 'non-covid'"
                )
            records.append(
                Record(
                    file=row["file"].strip(),
                    label=LABELS[label],
                    source=(row.get("source") or "").strip(),
                    patient=(row.get("patient") or "").strip(),
                )
            )
    return records


def fingerprint(folder: Path, records: list[Record]) -> str:
    """sha256 over the sorted (file, label, sha256 of bytes): identifies the training data."""
    digest = hashlib.sha256()
    for r in sorted(records, key=lambda r: r.file):
        path = folder / r.file
        content = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "missing"
        digest.update(f"{r.file}\t{r.label}\t{content}\n".encode())
    return digest.hexdigest()


def patient_split(
    records: list[Record], val_fraction: float = 0.2, seed: int = 42
) -> tuple[list[Record], list[Record]]:
    """Split by patient, stratified by (source, label): no patient on both sides.

    Within each stratum, patients are shuffled with ``seed`` and taken into validation until
    the stratum's share of validation images reaches ``val_fraction``.
    """
    by_patient: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        by_patient[r.group].append(r)
    strata: dict[tuple[str, int], list[str]] = defaultdict(list)
    for patient, recs in sorted(by_patient.items()):
        majority = round(sum(r.label for r in recs) / len(recs))
        strata[(recs[0].source, majority)].append(patient)
    rng = random.Random(seed)
    val_patients: set[str] = set()
    for key in sorted(strata):
        patients = strata[key]
        rng.shuffle(patients)
        total = sum(len(by_patient[p]) for p in patients)
        taken = 0
        for patient in patients:
            if taken >= val_fraction * total:
                break
            val_patients.add(patient)
            taken += len(by_patient[patient])
    train = [r for r in records if r.group not in val_patients]
    val = [r for r in records if r.group in val_patients]
    return train, val


class ArrayCache:
    """Preprocessed films on disk, one ``.npy`` (224x224 float32, one channel) per key."""

    def __init__(
        self,
        folder: Path,
        config: PreprocessConfig,
        segmenter_sha: str = "",
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        # the code of the path itself is part of the key: a retuned scope rule or resize must
        # never be answered from arrays the old code made
        code = b"".join(Path(m.__file__).read_bytes() for m in (imaging, dicom, lungs))
        self.salt = "|".join(
            (
                str(sorted(config.to_dict().items())),
                segmenter_sha,
                str(max_pixels),
                cv2.__version__,
                hashlib.sha256(code).hexdigest(),
            )
        )

    def _path(self, data: bytes) -> Path:
        key = hashlib.sha256(self.salt.encode() + hashlib.sha256(data).digest()).hexdigest()
        return self.folder / f"{key}.npy"

    def get(self, data: bytes) -> np.ndarray | str | None:
        """The cached input, the cached refusal code, or None on a miss."""
        path = self._path(data)
        if path.is_file():
            return np.repeat(np.load(path)[:, :, None], 3, axis=2)
        refusal = path.with_suffix(".refused")
        return refusal.read_text() if refusal.is_file() else None

    def put(self, data: bytes, value: np.ndarray | str) -> None:
        path = self._path(data)
        if isinstance(value, str):
            path.with_suffix(".refused").write_text(value)
            return
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, np.ascontiguousarray(value[:, :, 0]))
        tmp.replace(path)


def _load_one(
    data: bytes,
    config: PreprocessConfig,
    max_pixels: int,
    segmenter: LungSegmenter | None,
    cache: ArrayCache | None,
) -> np.ndarray | str:
    """The model input, or the code of the ImageError that refused the file."""
    hit = cache.get(data) if cache is not None else None
    if hit is not None:
        return hit
    try:
        value: np.ndarray | str = preprocess(data, config, max_pixels, segmenter)
    except ImageError as exc:
        value = exc.code
    if cache is not None:
        cache.put(data, value)
    return value


def load_images(
    folder: Path,
    records: list[Record],
    config: PreprocessConfig,
    max_pixels: int,
    progress: bool = False,
    segmenter: LungSegmenter | None = None,
    cache: ArrayCache | None = None,
) -> LoadedSet:
    """Preprocess every listed file; unreadable and out-of-scope ones are reported, not fatal."""
    kept: list[Record] = []
    arrays: list[np.ndarray] = []
    unreadable: list[tuple[str, str]] = []
    skipped: list[Record] = []
    iterator = records
    if progress:
        from tqdm import tqdm

        iterator = tqdm(records, desc="loading images", unit="img")
    for r in iterator:
        try:
            data = (folder / r.file).read_bytes()
        except OSError:
            unreadable.append((r.file, "unreadable_file"))
            continue
        value = _load_one(data, config, max_pixels, segmenter, cache)
        if isinstance(value, np.ndarray):
            arrays.append(value)
            kept.append(r)
        elif value in OUT_OF_SCOPE_CODES:  # a DICOM header's codes too
            skipped.append(r)
        else:
            unreadable.append((r.file, value))
    x = np.stack(arrays) if arrays else np.zeros((0, 224, 224, 3), np.float32)
    return LoadedSet(kept, x, unreadable, skipped)
