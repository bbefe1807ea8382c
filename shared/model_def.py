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


SMALL_SIZE = 128
SMALL_FILTERS = (16, 32, 64, 128)


def build_small(seed: int | None = None) -> Any:
    """A smaller network beside the paper's (recipe lever, MODEL_CARD.md): the same 224x224x3
    input, area-resized to 128 inside the model, four Conv3x3 + batch norm + ReLU + 2x2 max-pool
    blocks of 16/32/64/128 filters, global average pooling, dropout 0.3, Dense 1 sigmoid.  About
    a third of the paper's training cost per film and 1/57 of its parameters; Sequential, so
    Grad-CAM's last-Conv2D grid holds for it as for the paper's."""
    import keras
    from keras import layers

    init = keras.initializers.HeNormal(seed=seed)
    blocks: list[Any] = []
    for i, filters in enumerate(SMALL_FILTERS, start=1):
        blocks += [
            layers.Conv2D(
                filters,
                3,
                padding="same",
                use_bias=False,
                kernel_initializer=init,
                name=f"conv{i}",
            ),
            layers.BatchNormalization(name=f"bn{i}"),
            layers.Activation("relu", name=f"relu{i}"),
            layers.MaxPooling2D(2, name=f"pool{i}"),
        ]
    return keras.Sequential(
        [
            keras.Input(shape=INPUT_SHAPE, name="image"),
            layers.Resizing(SMALL_SIZE, SMALL_SIZE, interpolation="area", name="resize"),
            *blocks,
            layers.GlobalAveragePooling2D(name="gap"),
            layers.Dropout(0.3, seed=seed, name="dropout"),
            layers.Dense(
                1,
                activation="sigmoid",
                kernel_initializer=keras.initializers.GlorotUniform(seed=seed),
                name="output",
            ),
        ],
        name="cxr_small",
    )


#: Network builders by the name a model's metadata records as its ``architecture``.
PAPER_ARCHITECTURE = "paper-cnn-5631169"
SMALL_ARCHITECTURE = "small-gap-bn"
ARCHITECTURES = {PAPER_ARCHITECTURE: build_model, SMALL_ARCHITECTURE: build_small}


def build(architecture: str | None, seed: int | None = None) -> Any:
    """The network a model's metadata names (the paper's where it names none)."""
    name = architecture or PAPER_ARCHITECTURE
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; known: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[name](seed=seed)
