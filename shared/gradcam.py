"""Grad-CAM: where a Keras CNN looked, mapped back onto the film it scored.

Invariant: the map is computed in the classifier's own input frame, made by the one
preprocessing path (:func:`shared.imaging.lung_step` and :func:`shared.imaging.to_model_input`),
and mapped back onto the film through exactly the crop that path took (the segmenter's lung box,
then the border crop) and the resize.  So a value at a film pixel is the evidence at the point the
model saw there, and what the model never saw (outside the crop) is 0.

Grad-CAM (Selvaraju et al., 2017): on the last ``Conv2D`` layer (found by type), each channel
is weighted by the spatial mean of the gradient of the class score with respect to it; the
weighted sum, through a ReLU, is scaled to [0, 1].  The class score is the positive output's
logit (the final ``Dense`` layer before its activation), so a saturated sigmoid does not flatten
the gradient.  The conv grid is placed on the input frame at its cells' receptive-field centres
(valid convolutions and pooling shift them), not stretched over it.

TensorFlow and Keras are imported inside the functions, as in :mod:`shared.model_store`.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from shared.imaging import PreprocessConfig, lung_step, to_model_input
from shared.lungs import Box, LungFinding, LungSegmenter


@dataclass(frozen=True)
class Cam:
    """A class-activation map on the last conv layer's grid, and where that grid lies on the
    model's input: cell (i, j)'s centre is at ``origin + step * (i, j)`` (input pixels, y x)."""

    values: np.ndarray  # (grid height, grid width) float32 in [0, 1]
    origin: tuple[float, float]
    step: tuple[float, float]
    input_size: tuple[int, int]  # (height, width) of the model's input


@dataclass(frozen=True)
class Framed:
    """The model's input for a film, and the film pixels it was made from (end exclusive)."""

    model_input: np.ndarray  # (224, 224, 3) float32, as the classifier scores it
    box: tuple[int, int, int, int]  # (x0, y0, x1, y1) in film pixels


class _BoxRecorder:
    """Passed to :func:`lung_step` as its segmenter: the step runs unchanged, and the box it
    cropped to is kept (it returns only the cropped film)."""

    def __init__(self, segmenter: LungSegmenter) -> None:
        self._segmenter = segmenter
        self.box: Box | None = None

    def find(self, gray: np.ndarray, margin: float) -> LungFinding:
        finding = self._segmenter.find(gray, margin)
        self.box = finding.box
        return finding


def border_box(height: int, width: int, fraction: float) -> tuple[int, int, int, int]:
    """The border crop :func:`to_model_input` takes (``crop_fraction``), as (x0, y0, x1, y1);
    a test holds the two equal."""
    dy, dx = int(height * fraction), int(width * fraction)
    if fraction > 0 and height - 2 * dy >= 8 and width - 2 * dx >= 8:
        return dx, dy, width - dx, height - dy
    return 0, 0, width, height


def frame(gray: np.ndarray, config: PreprocessConfig, segmenter: LungSegmenter | None) -> Framed:
    """The classifier's input for a decoded film, by the one path, and the box it came from;
    raises what :func:`lung_step` raises (OutOfScopeError)."""
    recorder = _BoxRecorder(segmenter) if segmenter is not None else None
    cropped = lung_step(gray, config, recorder)  # type: ignore[arg-type]
    height, width = gray.shape
    lx0, ly0, lx1, ly1 = (
        recorder.box.pixels(width, height)
        if recorder is not None and recorder.box is not None
        else (0, 0, width, height)
    )
    if cropped.shape != (ly1 - ly0, lx1 - lx0):
        raise RuntimeError("the lung step cropped to another box than the one it found")
    bx0, by0, bx1, by1 = border_box(ly1 - ly0, lx1 - lx0, config.crop_fraction)
    box = (lx0 + bx0, ly0 + by0, lx0 + bx1, ly0 + by1)
    return Framed(to_model_input(cropped, config), box)


def last_conv_layer(model: Any) -> Any:
    """The model's last ``Conv2D`` layer (by type, whatever its name)."""
    import keras

    for layer in reversed(model.layers):
        if isinstance(layer, keras.layers.Conv2D):
            return layer
    raise ValueError(f"model {model.name!r} has no Conv2D layer")


# One gradient model per Keras model, built on first use (building one takes ~50 ms).
_GRAD_MODELS: weakref.WeakKeyDictionary[Any, tuple[Any, bool]] = weakref.WeakKeyDictionary()


def _grad_model(model: Any) -> tuple[Any, bool]:
    """A sub-model giving (last conv activations, head); the flag says the head is the input of
    a final Dense layer, whose logit is then computed by hand."""
    import keras

    cached = _GRAD_MODELS.get(model)
    if cached is not None:
        return cached
    conv = last_conv_layer(model)
    last = model.layers[-1]
    pre_activation = isinstance(last, keras.layers.Dense)
    head = last.input if pre_activation else model.outputs[0]
    (inputs,) = model.inputs  # one image in: what grad_cam feeds it
    lead = _leading_resize(model)
    if lead is None:
        built = (keras.Model(inputs, [conv.output, head]), pre_activation)
    else:
        # TensorFlow has no gradient for ResizeArea, and a watched input makes the tape ask
        # for it: the resize runs before the tape (:func:`grad_cam`), the rest is rebuilt on
        # its output with the same layers (the same weights)
        x = start = keras.Input(tuple(lead.output.shape[1:]))
        conv_out = None
        for layer in model.layers[1:]:
            if layer is last and pre_activation:
                break
            x = layer(x)
            if layer is conv:
                conv_out = x
        built = (keras.Model(start, [conv_out, x]), pre_activation)
    _GRAD_MODELS[model] = built
    return built


def _leading_resize(model: Any) -> Any:
    """The model's first layer where it is a (weightless) Resizing of a Sequential model."""
    import keras

    if isinstance(model, keras.Sequential) and isinstance(model.layers[0], keras.layers.Resizing):
        return model.layers[0]
    return None


def grad_cam(model: Any, image: np.ndarray, class_index: int = 0) -> Cam:
    """Grad-CAM of one input (H, W, C) for output unit ``class_index`` (the sigmoid's one)."""
    import tensorflow as tf

    grad_model, pre_activation = _grad_model(model)
    x = tf.convert_to_tensor(np.asarray(image, np.float32)[None])
    input_size = (int(x.shape[1]), int(x.shape[2]))
    lead = _leading_resize(model)
    if lead is not None:
        x = lead(x)
    with tf.GradientTape() as tape:
        tape.watch(x)  # records every op, also for a model whose weights are frozen
        acts, head = grad_model(x, training=False)
        if pre_activation:
            last = model.layers[-1]
            head = tf.matmul(head, last.kernel) + (last.bias if last.use_bias else 0.0)
        score = tf.reshape(head, (1, -1))[:, class_index]
    grads = tape.gradient(score, acts)
    weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
    cam = tf.nn.relu(tf.reduce_sum(acts * weights, axis=-1))[0].numpy().astype(np.float32)
    peak = float(cam.max())
    cam = cam / peak if peak > 0 else np.zeros_like(cam)
    origin, step = _grid_geometry(model, last_conv_layer(model), cam.shape, input_size)
    return Cam(cam, origin, step, input_size)


def _layer_map(layer: Any, size: tuple[int, int]) -> tuple[list[float], list[float]] | None:
    """(offset, stride) per axis such that output index n is centred at offset + stride * n
    of the layer's input; None when the layer's geometry is not known."""
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        return None
    if type(layer).__name__ == "Resizing":  # output n centred at (n + 0.5) * in / out - 0.5
        out = tuple(layer.output.shape[1:3])
        ratio = [i / o for i, o in zip(size, out, strict=True)]
        return [(r - 1) / 2 for r in ratio], ratio
    if hasattr(layer, "pool_size"):
        kernel, dilation = layer.pool_size, (1, 1)
    elif hasattr(layer, "kernel_size"):
        kernel, dilation = layer.kernel_size, layer.dilation_rate
    else:
        out = tuple(layer.output.shape[1:3])
        return ([0.0, 0.0], [1.0, 1.0]) if out == size else None
    offsets, strides = [], []
    for n_in, k, s, d in zip(size, kernel, layer.strides, dilation, strict=True):
        span = d * (k - 1) + 1
        pad = 0
        if layer.padding == "same":
            pad = max((-(-n_in // s) - 1) * s + span - n_in, 0) // 2
        offsets.append((span - 1) / 2 - pad)
        strides.append(float(s))
    return offsets, strides


def _grid_geometry(
    model: Any, conv: Any, grid: tuple[int, int], input_size: tuple[int, int]
) -> tuple[tuple[float, float], tuple[float, float]]:
    """Where the conv grid's cells are centred on the input: composed layer by layer for a
    Sequential model; otherwise (or for an unknown layer) the grid is stretched over the input."""
    import keras

    origin, step = [0.0, 0.0], [1.0, 1.0]
    known = isinstance(model, keras.Sequential)
    for layer in model.layers if known else ():
        mapped = _layer_map(layer, tuple(layer.input.shape[1:3]))
        if mapped is None:
            known = False
            break
        for axis in (0, 1):
            origin[axis] += step[axis] * mapped[0][axis]
            step[axis] *= mapped[1][axis]
        if layer is conv:
            break
    if known:
        return (origin[0], origin[1]), (step[0], step[1])
    stretch = [n / g for n, g in zip(input_size, grid, strict=True)]
    return ((stretch[0] - 1) / 2, (stretch[1] - 1) / 2), (stretch[0], stretch[1])


def _axis_map(
    out: int, film: int, lo: int, hi: int, size: int, origin: float, step: float
) -> tuple[np.ndarray, np.ndarray]:
    """For each output pixel along one axis: its coordinate on the cam grid, and whether the
    model saw that part of the film (pixel centres, as cv2.resize counts them)."""
    at = (np.arange(out) + 0.5) * (film / out) - 0.5  # on the film
    seen = (at >= lo - 0.5) & (at <= hi - 0.5)
    on_input = (at - lo + 0.5) * (size / (hi - lo)) - 0.5  # to_model_input's resize
    return ((on_input - origin) / step).astype(np.float32), seen


def on_film(
    cam: Cam,
    box: tuple[int, int, int, int],
    film_shape: tuple[int, int],
    out_shape: tuple[int, int] | None = None,
) -> np.ndarray:
    """The map on the film (or on the film downscaled to ``out_shape``): float32 in [0, 1],
    0 where the model never looked."""
    height, width = film_shape
    out_h, out_w = out_shape or film_shape
    x0, y0, x1, y1 = box
    gx, seen_x = _axis_map(out_w, width, x0, x1, cam.input_size[1], cam.origin[1], cam.step[1])
    gy, seen_y = _axis_map(out_h, height, y0, y1, cam.input_size[0], cam.origin[0], cam.step[0])
    map_x = np.ascontiguousarray(np.broadcast_to(gx[None, :], (out_h, out_w)))
    map_y = np.ascontiguousarray(np.broadcast_to(gy[:, None], (out_h, out_w)))
    heat = cv2.remap(cam.values, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return np.where(seen_y[:, None] & seen_x[None, :], heat, 0.0).astype(np.float32)
