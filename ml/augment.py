"""Training-time augmentations, as TensorFlow ops on batches of model inputs in [0, 1].

Invariant: nothing here mirrors a film (the heart is on the left and markers have a side), and
every random draw is a stateless op seeded from (run seed, batch counter), so a run is
reproducible to the byte with op determinism on.  ``basic`` is the shipped recipes' geometry and
contrast jitter; ``acquisition`` adds what differs between scanners and hospitals' pipelines
(JPEG re-encoding at quality 20-95, blur and sharpening, noise, gamma, random erasing, random
resized crops), so that the way a film was acquired and stored carries less of its source.
"""

from __future__ import annotations

from typing import Any

AUGMENTS = ("basic", "acquisition")


def basic(seed: int) -> Any:
    """Rotation ±7°, shifts 5%, zoom 10%, brightness and contrast ±10% (Keras layers)."""
    import keras

    return keras.Sequential(
        [
            keras.layers.RandomRotation(0.02, fill_mode="constant", seed=seed),  # ~7 deg
            keras.layers.RandomTranslation(0.05, 0.05, fill_mode="constant", seed=seed),
            keras.layers.RandomZoom(0.1, fill_mode="constant", seed=seed),
            keras.layers.RandomBrightness(0.1, value_range=(0.0, 1.0), seed=seed),
            keras.layers.RandomContrast(0.1, seed=seed),
        ],
        name="augment",
    )


def _gaussian_kernel(sigma: float, radius: int) -> Any:
    import tensorflow as tf

    x = tf.range(-radius, radius + 1, dtype=tf.float32)
    k = tf.exp(-(x**2) / (2.0 * sigma**2))
    k = k / tf.reduce_sum(k)
    return tf.tensordot(k, k, axes=0)[:, :, None, None]


def acquisition(x: Any, seed: Any) -> Any:
    """The acquisition augmentations on a (n, h, w, 3) batch of replicated-gray films.

    ``seed`` is a shape-(2,) int tensor; each op draws from its own fold of it."""
    import tensorflow as tf

    n = tf.shape(x)[0]
    size = tf.shape(x)[1:3]
    gray = x[..., :1]

    def fold(k: int) -> Any:  # an independent stateless stream per op
        return seed + tf.constant([0, k], seed.dtype)

    def u(k: int, shape: Any, lo: float, hi: float) -> Any:
        return tf.random.stateless_uniform(shape, fold(k), lo, hi)

    # random resized crop: 75-100% of the area, aspect 0.85-1.15, back to full size
    scale = tf.sqrt(u(1, [n], 0.75, 1.0))
    aspect = tf.sqrt(u(2, [n], 0.85, 1.15))
    hh = tf.minimum(scale / aspect, 1.0)
    ww = tf.minimum(scale * aspect, 1.0)
    y0 = u(3, [n], 0.0, 1.0) * (1.0 - hh)
    x0 = u(4, [n], 0.0, 1.0) * (1.0 - ww)
    boxes = tf.stack([y0, x0, y0 + hh, x0 + ww], axis=1)
    gray = tf.image.crop_and_resize(gray, boxes, tf.range(n), size)

    # blur (amount < 0) or sharpen (amount > 0) around a Gaussian of sigma 1.5
    blurred = tf.nn.conv2d(gray, _gaussian_kernel(1.5, 4), 1, "SAME")
    amount = u(5, [n, 1, 1, 1], -0.8, 1.0)
    gray = tf.clip_by_value(gray + amount * (gray - blurred), 0.0, 1.0)

    # gamma 0.67-1.5
    gamma = tf.exp(u(6, [n, 1, 1, 1], -0.4, 0.4))
    gray = tf.pow(tf.maximum(gray, 1e-6), gamma)

    # detector noise, sigma 0-0.03
    sigma = u(7, [n, 1, 1, 1], 0.0, 0.03)
    gray = gray + sigma * tf.random.stateless_normal(tf.shape(gray), fold(8))

    # random erasing: half of the films lose a rectangle of 2-12% of the area to a flat grey
    area = u(9, [n], 0.02, 0.12)
    eh = tf.sqrt(area)
    ey0 = u(10, [n], 0.0, 1.0) * (1.0 - eh)
    ex0 = u(11, [n], 0.0, 1.0) * (1.0 - eh)
    on = tf.cast(u(12, [n], 0.0, 1.0) < 0.5, tf.float32)
    ys = tf.linspace(0.0, 1.0, size[0])[None, :, None]
    xs = tf.linspace(0.0, 1.0, size[1])[None, None, :]
    inside = (
        tf.cast(ys >= ey0[:, None, None], tf.float32)
        * tf.cast(ys < (ey0 + eh)[:, None, None], tf.float32)
        * tf.cast(xs >= ex0[:, None, None], tf.float32)
        * tf.cast(xs < (ex0 + eh)[:, None, None], tf.float32)
    )[..., None] * on[:, None, None, None]
    fill = u(13, [n, 1, 1, 1], 0.0, 1.0)
    gray = gray * (1.0 - inside) + fill * inside
    gray = tf.clip_by_value(gray, 0.0, 1.0)

    # JPEG re-encoding at quality 20-95, one quality per film
    quality = tf.cast(u(14, [n], 20.0, 96.0), tf.int32)

    def jpeg(args: Any) -> Any:
        img, q = args
        return tf.image.adjust_jpeg_quality(img, q)

    gray = tf.map_fn(jpeg, (gray, quality), fn_output_signature=tf.float32)
    gray = tf.reshape(gray, tf.shape(x[..., :1]))
    return tf.repeat(gray, 3, axis=-1)
