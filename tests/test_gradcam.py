"""Grad-CAM (shared/gradcam.py): it points at what decides the class, and it lands on the film
where the model saw it, through the crops and the resize of the one preprocessing path."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from ml.synthetic import chest_film
from shared.gradcam import Cam, border_box, frame, grad_cam, last_conv_layer, on_film
from shared.imaging import PAPER, PreprocessConfig, to_model_input

# The blob task: films of HEIGHT x WIDTH (not square, so a swapped axis shows) on a smooth
# background; every film holds a dark disc (sharp edges, like the blob's, but no evidence), and
# the positive ones a bright disc of radius RADIUS somewhere: it alone decides the class.
HEIGHT, WIDTH, RADIUS = 96, 128, 7


def _scene(rng: np.random.Generator, positive: bool) -> tuple[np.ndarray, tuple[int, int] | None]:
    small = rng.random((6, 8)).astype(np.float32)
    base = cv2.resize(small, (WIDTH, HEIGHT), interpolation=cv2.INTER_CUBIC)
    img = 0.3 + 0.35 * np.clip(base, 0, 1) + rng.normal(0, 0.03, base.shape).astype(np.float32)

    def somewhere() -> tuple[int, int]:
        margin = RADIUS + 2
        return int(rng.integers(margin, WIDTH - margin)), int(rng.integers(margin, HEIGHT - margin))

    cv2.circle(img, somewhere(), RADIUS, 0.0, -1)
    centre = somewhere() if positive else None
    if centre is not None:
        cv2.circle(img, centre, RADIUS, 0.95, -1)
    return np.clip(img, 0, 1).astype(np.float32), centre


def _tiny_cnn(seed: int):
    """Small enough to learn the blob task in seconds on two cores; a valid-padded Conv/pool
    stack with the paper's sigmoid head."""
    import keras
    from keras import layers

    from shared.model_def import INPUT_SHAPE

    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input(INPUT_SHAPE),
            layers.AveragePooling2D(4),
            layers.Conv2D(8, 3, activation="relu", name="features"),
            layers.MaxPooling2D(2),
            layers.Conv2D(16, 3, activation="relu", name="not_named_conv"),
            layers.GlobalMaxPooling2D(),
            layers.Dense(1, activation="sigmoid"),
        ]
    )


@pytest.fixture(scope="module")
def blob_model():
    import keras

    rng = np.random.default_rng(0)
    scenes = [_scene(rng, positive=n % 2 == 0) for n in range(256)]
    x = np.stack([frame(img, PAPER, None).model_input for img, _ in scenes])
    y = np.array([centre is not None for _, centre in scenes], np.float32)
    model = _tiny_cnn(seed=0)
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="binary_crossentropy")
    model.fit(x, y, epochs=12, batch_size=32, verbose=0)
    return model


def test_the_heat_maps_peak_lies_on_the_blob_that_decides_the_class(blob_model) -> None:
    rng = np.random.default_rng(1)
    films = [_scene(rng, positive=True) for _ in range(40)]
    hits = 0
    for img, (cx, cy) in films:
        framed = frame(img, PAPER, None)
        heat = on_film(grad_cam(blob_model, framed.model_input), framed.box, img.shape)
        assert heat.shape == img.shape
        py, px = np.unravel_index(int(np.argmax(heat)), heat.shape)
        hits += bool(np.hypot(px - cx, py - cy) <= RADIUS + 3)
    assert hits >= 0.8 * len(films), f"only {hits} of {len(films)} peaks on the blob"


def test_the_last_conv_layer_is_found_by_type_not_by_name() -> None:
    assert last_conv_layer(_tiny_cnn(seed=1)).name == "not_named_conv"


def test_grad_cam_on_the_papers_cnn_places_its_grid_at_the_receptive_field_centres() -> None:
    """conv3's cell n is centred at input pixel 8.5 + 4n (three valid 3x3 convs, two 2x2
    pools before it): the map is placed there, not stretched over the input."""
    from shared.model_def import build_model

    image = np.random.default_rng(2).random((224, 224, 3)).astype(np.float32)
    cam = grad_cam(build_model(seed=3), image)
    assert cam.values.shape == (52, 52)
    assert cam.origin == (8.5, 8.5)
    assert cam.step == (4.0, 4.0)
    assert cam.input_size == (224, 224)
    assert cam.values.min() >= 0.0
    assert cam.values.max() <= 1.0


# --------------------------------------------------------------------------- back onto the film


def _delta_cam(row: int, col: int, grid: int, origin: float, step: float) -> Cam:
    values = np.zeros((grid, grid), np.float32)
    values[row, col] = 1.0
    return Cam(values, (origin, origin), (step, step), (224, 224))


@pytest.mark.parametrize("out_shape", [None, (150, 200)])
def test_a_point_of_the_map_lands_where_the_crop_box_and_the_resize_put_it(out_shape) -> None:
    """Film 300 x 400; the model saw the box x 100..212, y 50..274 (112 x 224 pixels, resized
    to 224 x 224).  Grid cell (10, 40) is centred at input pixel (y, x) = (41.5, 161.5), that
    is at film x = 100 + (161.5 + 0.5) * 112 / 224 - 0.5 = 180.5 and y = 50 + 42 - 0.5 = 91.5."""
    cam = _delta_cam(10, 40, grid=56, origin=1.5, step=4.0)
    heat = on_film(cam, (100, 50, 212, 274), (300, 400), out_shape)
    scale = 1.0 if out_shape is None else 0.5
    assert heat.shape == (out_shape or (300, 400))
    peak_y, peak_x = np.unravel_index(int(np.argmax(heat)), heat.shape)
    # output pixel centres on the film: (k + 0.5) / scale - 0.5
    assert abs((peak_x + 0.5) / scale - 0.5 - 180.5) <= 1.0 / scale
    assert abs((peak_y + 0.5) / scale - 0.5 - 91.5) <= 1.0 / scale
    full = on_film(
        Cam(np.ones((56, 56), np.float32), (1.5, 1.5), (4.0, 4.0), (224, 224)),
        (100, 50, 212, 274),
        (300, 400),
    )
    assert full[50:274, 100:212].min() == 1.0  # all the box, and nothing else
    assert full.sum() == 112 * 224


def test_a_mark_on_the_film_comes_back_to_its_place_through_the_lung_crop() -> None:
    """The real path: the bundled segmenter crops a generated film to its lung fields and a
    border crop follows; a mark painted on the film, found in the model's input and sent back
    by on_film, returns to where it was painted."""
    from shared.lungs import DEFAULT_SEGMENTER_PATH, LungSegmenter

    segmenter = LungSegmenter(DEFAULT_SEGMENTER_PATH)
    config = PreprocessConfig(lung_crop=True, crop_fraction=0.05)
    film = chest_film(5, height=420, width=360).astype(np.float32) / 255.0 * 0.8
    mark_x, mark_y = 120, 200  # in the left lung field
    film[mark_y - 2 : mark_y + 3, mark_x - 2 : mark_x + 3] = 1.0
    framed = frame(film, config, segmenter)
    x0, y0, x1, y1 = framed.box
    assert (x1 - x0, y1 - y0) != film.shape[::-1], "the film was cropped"
    seen = framed.model_input[:, :, 0]
    u_y, u_x = np.unravel_index(int(np.argmax(seen)), seen.shape)
    point = np.zeros((224, 224), np.float32)
    point[u_y, u_x] = 1.0
    back = on_film(Cam(point, (0.0, 0.0), (1.0, 1.0), (224, 224)), framed.box, film.shape)
    b_y, b_x = np.unravel_index(int(np.argmax(back)), back.shape)
    step = max((x1 - x0) / 224, (y1 - y0) / 224)  # one input pixel, on the film
    assert abs(b_x - mark_x) <= 2 + step
    assert abs(b_y - mark_y) <= 2 + step


def test_the_border_crop_is_the_one_to_model_input_takes() -> None:
    gray = np.random.default_rng(4).random((173, 251)).astype(np.float32)
    config = PreprocessConfig(crop_fraction=0.1)
    x0, y0, x1, y1 = border_box(*gray.shape, config.crop_fraction)
    assert (x0, y0) == (25, 17)
    np.testing.assert_array_equal(
        to_model_input(gray, config), to_model_input(gray[y0:y1, x0:x1], PAPER)
    )
    assert border_box(12, 12, 0.3) == (0, 0, 12, 12)  # too small to crop: to_model_input keeps it
    tiny = gray[:12, :12]
    np.testing.assert_array_equal(
        to_model_input(tiny, PreprocessConfig(crop_fraction=0.3)), to_model_input(tiny, PAPER)
    )


def test_grad_cam_runs_on_the_small_network_and_maps_its_grid_exactly() -> None:
    """The small network resizes inside the model (ResizeArea has no gradient in TensorFlow):
    Grad-CAM runs the resize before its tape, and its grid geometry includes the resize."""
    from shared.model_def import build_small

    cam = grad_cam(build_small(seed=1), np.random.default_rng(0).random((224, 224, 3), np.float32))
    assert cam.values.shape == (16, 16)  # 128 px after four 2x2 pools, before the last
    assert cam.step == (14.0, 14.0)  # 224 / 16: the grid spans the input exactly
    assert cam.origin == pytest.approx((6.5, 6.5))
