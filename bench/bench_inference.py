"""Inference throughput: the compiled batch path the workers use vs ``model.predict`` per image.

    python bench/bench_inference.py [--images 256] [--batch 32]

Prints images/second for each path and the ratio, all measured in this process on the same
preprocessed inputs (generated images; no patient data).  Preprocessing (OpenCV decode + resize,
and the lung segmenter where the model crops to the lung fields) is timed separately, with and
without the lung step, since a worker does both.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from ml.synthetic import chest_film, png_bytes
from shared.imaging import PreprocessConfig, preprocess
from shared.model_store import Classifier
from shared.settings import DEFAULT_MODEL_PATH


def timed(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument(
        "--baseline-images",
        type=int,
        default=32,
        help="model.predict is slow: time it on fewer images",
    )
    args = parser.parse_args()

    files = [png_bytes(chest_film(n, height=1024, width=1024)) for n in range(args.images)]
    clf = Classifier.load(DEFAULT_MODEL_PATH)

    def prep(data: bytes) -> np.ndarray:
        return preprocess(data, clf.info.preprocess, segmenter=clf.segmenter)

    t_pre = timed(lambda: [prep(f) for f in files], repeat=1)
    t_plain = timed(lambda: [preprocess(f, PreprocessConfig()) for f in files], repeat=1)
    batch = np.stack([prep(f) for f in files])

    clf.predict(batch[: args.batch])  # warm up
    t_batch = timed(lambda: clf.predict(batch, batch_size=args.batch))
    n_base = min(args.baseline_images, args.images)
    clf.model.predict(batch[:1], verbose=0)  # warm up
    t_base = timed(lambda: [clf.model.predict(batch[i : i + 1], verbose=0) for i in range(n_base)])

    rate_pre = args.images / t_pre
    rate_batch = args.images / t_batch
    rate_base = n_base / t_base
    rate_plain = args.images / t_plain
    print(
        f"preprocess without the lung step     : {rate_plain:8.1f} img/s  "
        f"({1000 / rate_plain:.2f} ms/img)"
    )
    print(
        f"preprocess, the model's own (lungs {clf.info.preprocess.lung_crop!s:5s}): "
        f"{rate_pre:8.1f} img/s  ({1000 / rate_pre:.2f} ms/img)"
    )
    print(
        f"baseline  model.predict, 1 image/call : {rate_base:8.1f} img/s  "
        f"({1000 / rate_base:.2f} ms/img)"
    )
    print(
        f"worker    compiled fn, batch {args.batch:<3d}      : {rate_batch:8.1f} img/s  "
        f"({1000 / rate_batch:.2f} ms/img)"
    )
    print(f"speed-up of the worker path over the baseline: {rate_batch / rate_base:.1f}x")
    same = np.allclose(
        clf.predict_raw(batch[:n_base]),
        np.concatenate(
            [clf.model.predict(batch[i : i + 1], verbose=0) for i in range(n_base)]
        ).ravel(),
        atol=1e-5,
    )
    print(f"both paths agree to 1e-5: {same}")


if __name__ == "__main__":
    main()
