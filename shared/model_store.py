"""Model files on disk: weights (``.npz``) plus metadata (``.json``) side by side.

The metadata records the version, the sha256 of the weights file, the decision threshold, the
preprocessing config and the validation metrics.  Loading checks the sha256, so a model that was
swapped or corrupted on disk is refused rather than served.  Weights are stored as float16 to
keep the committed file small; the metrics in the metadata were computed on exactly these
rounded weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shared.imaging import PreprocessConfig

log = logging.getLogger(__name__)


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
    return ModelInfo(
        path=weights_path,
        version=str(meta["version"]),
        sha256=str(meta["sha256"]),
        threshold=float(meta["threshold"]),
        preprocess=PreprocessConfig.from_dict(meta.get("preprocess")),
        metadata=meta,
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

        from shared.model_def import INPUT_SHAPE, build_model

        if threads > 0:
            try:
                tf.config.threading.set_intra_op_parallelism_threads(threads)
                tf.config.threading.set_inter_op_parallelism_threads(1)
            except RuntimeError:  # already initialised in this process
                pass
        self.info = info
        self.model = build_model()
        with np.load(info.path) as npz:
            weights = [npz[k].astype(np.float32) for k in sorted(npz.files)]
        self.model.set_weights(weights)
        self._fn = tf.function(
            lambda x: self.model(x, training=False),
            input_signature=[tf.TensorSpec((None, *INPUT_SHAPE), tf.float32)],
            reduce_retracing=True,
        )
        self._fn(np.zeros((1, *INPUT_SHAPE), np.float32))  # trace once, now

    @classmethod
    def load(cls, path: Path, threads: int = 0) -> Classifier:
        return cls(read_model_info(path), threads=threads)

    def predict(self, batch: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Probabilities of COVID-19 for a (n, 224, 224, 3) float32 batch."""
        if len(batch) == 0:
            return np.zeros((0,), np.float32)
        out = [
            np.asarray(self._fn(np.ascontiguousarray(batch[i : i + batch_size], np.float32)))
            for i in range(0, len(batch), batch_size)
        ]
        return np.concatenate(out).reshape(-1)
