"""The paper's CNN, layer for layer.

Input 224x224x3; three Conv3x3 (valid padding) blocks of 32/64/128 filters, each followed by
ReLU and 2x2 max-pooling; Flatten; Dense 64 (ReLU); Dense 1 (sigmoid). 5,631,169 parameters.
TensorFlow is imported inside the function so that importing this module stays cheap and
fork-safe (the Celery parent process must never load TensorFlow).
"""

from __future__ import annotations

from typing import Any

INPUT_SIZE = 224
INPUT_SHAPE = (INPUT_SIZE, INPUT_SIZE, 3)

#: (layer name, output shape without batch axis, parameter count), as in the paper's table.
PAPER_TABLE: tuple[tuple[str, tuple[int, ...], int], ...] = (
    ("conv1", (222, 222, 32), 896),
    ("pool1", (111, 111, 32), 0),
    ("conv2", (109, 109, 64), 18496),
    ("pool2", (54, 54, 64), 0),
    ("conv3", (52, 52, 128), 73856),
    ("pool3", (26, 26, 128), 0),
    ("flatten", (86528,), 0),
    ("dense", (64,), 5537856),
    ("output", (1,), 65),
)
TOTAL_PARAMS = 5_631_169


def build_model(seed: int | None = None) -> Any:
    """Return the uncompiled Keras model of the paper."""
    import keras
    from keras import layers

    init = keras.initializers.GlorotUniform(seed=seed)
    return keras.Sequential(
        [
            keras.Input(shape=INPUT_SHAPE, name="image"),
            layers.Conv2D(32, 3, activation="relu", kernel_initializer=init, name="conv1"),
            layers.MaxPooling2D(2, name="pool1"),
            layers.Conv2D(64, 3, activation="relu", kernel_initializer=init, name="conv2"),
            layers.MaxPooling2D(2, name="pool2"),
            layers.Conv2D(128, 3, activation="relu", kernel_initializer=init, name="conv3"),
            layers.MaxPooling2D(2, name="pool3"),
            layers.Flatten(name="flatten"),
            layers.Dense(64, activation="relu", kernel_initializer=init, name="dense"),
            layers.Dense(1, activation="sigmoid", kernel_initializer=init, name="output"),
        ],
        name="cxr_cnn",
    )
