"""Heat maps on demand: where the classifier looked on one film, drawn over it as a PNG.

Invariant: the film is read from the blob store and decoded and preprocessed by the same
functions that scored it (:func:`shared.imaging.decode_grayscale`, then
:func:`shared.gradcam.frame`: the lung step and ``to_model_input``), with the worker's own
classifier, so the map explains the score that model gave.  The PNG is written to the blob store
(content-addressed); naming it for the API is the caller's part (``shared.queue``).  Nothing
here logs pixels or filenames.
"""

from __future__ import annotations

import cv2
import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from shared.gradcam import frame, grad_cam, on_film
from shared.imaging import decode_grayscale
from shared.model_store import Classifier
from shared.models import Image
from shared.settings import Settings
from shared.storage import BlobStore

#: The overlay's longest side, in pixels: enough to read a film on a screen, small to send.
MAX_SIDE = 1024
#: How much of the colour map covers the film where the evidence is strongest (none where it
#: is 0, so what the model did not look at stays plain grayscale).
OPACITY = 0.5


def overlay_shape(film_shape: tuple[int, int], max_side: int = MAX_SIDE) -> tuple[int, int]:
    """(height, width) of the overlay: the film's, scaled down to ``max_side`` at most."""
    height, width = film_shape
    scale = min(1.0, max_side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def _bytes(values: np.ndarray) -> np.ndarray:
    return np.clip(values + 0.5, 0, 255).astype(np.uint8)


def overlay(gray: np.ndarray, heat: np.ndarray) -> bytes:
    """PNG of the film (float [0, 1]) resized to ``heat``'s shape, with ``heat`` drawn over it
    in OpenCV's JET colour map."""
    out_h, out_w = heat.shape
    if gray.shape != heat.shape:
        gray = cv2.resize(gray, (out_w, out_h), interpolation=cv2.INTER_AREA)
    film = cv2.cvtColor(_bytes(gray * 255.0), cv2.COLOR_GRAY2BGR)
    colour = cv2.applyColorMap(_bytes(heat * 255.0), cv2.COLORMAP_JET)
    alpha = (OPACITY * heat)[:, :, None]
    ok, buf = cv2.imencode(".png", _bytes(film * (1.0 - alpha) + colour * alpha))
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def heatmap_png(data: bytes, classifier: Classifier, max_pixels: int) -> bytes:
    """The overlay PNG for the bytes of one film; raises what decoding and the lung step raise
    (ImageError and its subclasses)."""
    gray = decode_grayscale(data, max_pixels)
    framed = frame(gray, classifier.info.preprocess, classifier.segmenter)
    cam = grad_cam(classifier.model, framed.model_input)
    heat = on_film(cam, framed.box, gray.shape, overlay_shape(gray.shape))
    return overlay(gray, heat)


def render_heatmap(
    image_id: str,
    sessions: sessionmaker[Session],
    blobs: BlobStore,
    classifier: Classifier,
    settings: Settings,
) -> str | None:
    """Render one image's heat map and store it; returns its blob key, or None when the image
    is gone.  A film that cannot be read or decoded any more raises (BlobNotFoundError,
    BlobCorruptError, ImageError), as does an unreachable store or database."""
    with sessions() as session:
        blob_key = session.scalar(select(Image.blob_key).where(Image.id == image_id))
    if blob_key is None:
        return None
    png = heatmap_png(blobs.get(blob_key), classifier, settings.max_image_pixels)
    return blobs.put(png)
