"""Model files on disk: weights (``.npz``) plus metadata (``.json``) side by side.

The metadata records the version, the sha256 of the weights file, the decision threshold, the
preprocessing config, the calibration and the validation metrics.  Loading checks the sha256 (of
the segmenter too, where the model crops to the lung fields), so a model that was swapped or
corrupted on disk is refused rather than served.  ``Classifier.predict`` returns *calibrated*
probabilities, and the threshold applies to those.  Weights are stored as float16 to
keep the committed file small; the metrics in the metadata were computed on exactly these
rounded weights.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shared.imaging import PreprocessConfig
from shared.lungs import LungSegmenter


class ModelFileError(RuntimeError):
    """The model or its metadata is missing, unreadable or fails its checksum."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def metadata_path(weights_path: Path) -> Path:
    return Path(weights_path).with_suffix(".json")


@dataclass(frozen=True)
class ModelInfo:
    """What a model file says about itself (no TensorFlow needed)."""

    path: Path
    version: str
    sha256: str
    threshold: float
    preprocess: PreprocessConfig
    metadata: dict[str, Any]

    def label(self, probability: float) -> str:
        return "covid" if probability >= self.threshold else "non-covid"

    @property
    def segmenter_path(self) -> Path | None:
        seg = self.metadata.get("segmenter")
        return self.path.parent / seg["file"] if seg else None

    def calibrate(self, raw: np.ndarray) -> np.ndarray:
        """The network's sigmoid output -> the calibrated probability (Platt scaling on the
        logit, fitted on the early-stopping split; identity where the metadata has none)."""
        return calibrate(raw, self.metadata.get("calibration"))


def logit(p: np.ndarray) -> np.ndarray:
    """log(p / (1 - p)), clipped away from 0 and 1: what Platt scaling is fitted and applied on."""
    p = np.clip(np.asarray(p, np.float64), 1e-7, 1 - 1e-7)
    return np.log(p) - np.log1p(-p)


def calibrate(raw: np.ndarray, calibration: dict[str, Any] | None) -> np.ndarray:
    raw = np.asarray(raw, np.float64)
    if not calibration:
        return raw.astype(np.float32)
    z = float(calibration["slope"]) * logit(raw) + float(calibration["intercept"])
    return (1.0 / (1.0 + np.exp(-z))).astype(np.float32)


def read_model_info(weights_path: Path, verify: bool = True) -> ModelInfo:
    """Read and (by default) checksum-verify a model's metadata."""
    weights_path = Path(weights_path)
    meta_file = metadata_path(weights_path)
    if not weights_path.is_file():
        raise ModelFileError(f"model weights not found: {weights_path}")
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"model metadata unreadable: {meta_file}: {exc}") from exc
    for key in ("version", "sha256", "threshold"):
        if key not in meta:
            raise ModelFileError(f"model metadata {meta_file} lacks {key!r}")
    if verify:
        actual = sha256_file(weights_path)
        if actual != meta["sha256"]:
            raise ModelFileError(
                f"checksum mismatch for {weights_path}: metadata says {meta['sha256']}, "
                f"file is {actual}"
            )
    if verify and meta.get("segmenter"):
        _verify_segmenter(weights_path.parent / meta["segmenter"]["file"], meta["segmenter"])
    return ModelInfo(
        path=weights_path,
        version=str(meta["version"]),
        sha256=str(meta["sha256"]),
        threshold=float(meta["threshold"]),
        preprocess=PreprocessConfig.from_dict(meta.get("preprocess")),
        metadata=meta,
    )


def _verify_segmenter(path: Path, entry: dict[str, Any]) -> None:
    """The segmenter a model names must be beside it, intact, and the one it was trained with."""
    from shared.lungs import SegmenterFileError, read_segmenter_metadata

    try:
        meta = read_segmenter_metadata(path)
    except SegmenterFileError as exc:
        raise ModelFileError(str(exc)) from exc
    if meta.get("sha256") != entry.get("sha256"):
        raise ModelFileError(
            f"{path} is not the segmenter this model was trained with "
            f"(sha256 {str(meta.get('sha256'))[:12]}, expected {str(entry.get('sha256'))[:12]})"
        )
    scope = entry.get("scope_net")
    if scope:  # the scope decisions the model was trained and calibrated with
        scope_path = path.parent / scope["file"]
        if not scope_path.is_file() or sha256_file(scope_path) != scope.get("sha256"):
            raise ModelFileError(
                f"{scope_path} is missing or not the scope net this model was trained with"
            )


def save_weights(model: Any, path: Path) -> str:
    """Write the model's weights as float16 ``.npz``; return the file's sha256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {
        f"w{i:02d}": np.asarray(w, dtype=np.float16) for i, w in enumerate(model.get_weights())
    }
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)
    return sha256_file(path)


def round_weights(model: Any) -> None:
    """Round the model's weights to float16 in place, so metrics match the stored file."""
    model.set_weights([np.asarray(w, np.float16).astype(np.float32) for w in model.get_weights()])


def write_metadata(weights_path: Path, metadata: dict[str, Any]) -> None:
    metadata_path(weights_path).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")


class Classifier:
    """The CNN loaded once, with a compiled batch function (``model.predict`` is ~55 ms/call)."""

    def __init__(self, info: ModelInfo, threads: int = 0) -> None:
        import tensorflow as tf

        from shared.model_def import INPUT_SHAPE, build

        if threads > 0:
            try:
                tf.config.threading.set_intra_op_parallelism_threads(threads)
                tf.config.threading.set_inter_op_parallelism_threads(1)
            except RuntimeError:  # already initialised in this process
                pass
        self.info = info
        self.model = build(info.metadata.get("architecture"))
        with np.load(info.path) as npz:
            weights = [npz[k].astype(np.float32) for k in sorted(npz.files)]
        self.model.set_weights(weights)
        self._fn = tf.function(
            lambda x: self.model(x, training=False),
            input_signature=[tf.TensorSpec((None, *INPUT_SHAPE), tf.float32)],
            reduce_retracing=True,
        )
        self._fn(np.zeros((1, *INPUT_SHAPE), np.float32))  # trace once, now
        self.segmenter: LungSegmenter | None = None
        if info.preprocess.lung_crop:
            seg_path = info.segmenter_path
            if seg_path is None:
                raise ModelFileError(f"{info.path} crops to the lung fields but names no segmenter")
            self.segmenter = LungSegmenter(seg_path)

    @classmethod
    def load(cls, path: Path, threads: int = 0) -> Classifier:
        return cls(read_model_info(path), threads=threads)

    def predict(self, batch: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Calibrated probabilities of COVID-19 for a (n, 224, 224, 3) float32 batch."""
        return self.info.calibrate(self.predict_raw(batch, batch_size))

    def predict_raw(self, batch: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """The network's own sigmoid output, before calibration."""
        if len(batch) == 0:
            return np.zeros((0,), np.float32)
        out = [
            np.asarray(self._fn(np.ascontiguousarray(batch[i : i + batch_size], np.float32)))
            for i in range(0, len(batch), batch_size)
        ]
        return np.concatenate(out).reshape(-1)
