"""Generated images that are *not* frontal chest radiographs, for the scope check.

Invariant: nothing here is made from a real film.  Each kind stands for something a hospital
batch really holds besides frontal chest films: documents and screenshots, photographs,
noise from a broken detector, blank frames, films of limbs, and round cross-sections that look
like a CT slice.  :func:`chest_film` is the one generated *frontal* film, for tests and
benchmarks, drawn so that the lung segmenter finds both fields.  Deterministic in ``seed``.
"""

from __future__ import annotations

import cv2
import numpy as np

KINDS = ("document", "photo", "noise", "blank", "gradient", "limb", "cross_section", "shapes")


def _document(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    img = np.full((h, w), 235, np.uint8)
    for row in range(20, h - 20, 18):
        words = rng.integers(3, 9)
        x = 20
        for _ in range(words):
            text = "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(2, 9)))
            cv2.putText(img, text, (x, row), cv2.FONT_HERSHEY_SIMPLEX, 0.45, 20, 1, cv2.LINE_AA)
            x += 12 * len(text)
            if x > w - 60:
                break
    return img


def _photo(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    base = cv2.resize(rng.random((8, 8)).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    img = np.clip(base * 255, 0, 255).astype(np.uint8)
    for _ in range(rng.integers(3, 8)):
        c = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        axes = (int(rng.integers(10, w // 3)), int(rng.integers(10, h // 3)))
        cv2.ellipse(img, c, axes, float(rng.uniform(0, 180)), 0, 360, int(rng.integers(0, 255)), -1)
    return cv2.GaussianBlur(img, (0, 0), 2)


def _limb(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    img = np.full((h, w), int(rng.integers(5, 40)), np.uint8)
    cx = w // 2 + int(rng.integers(-w // 8, w // 8))
    cv2.ellipse(img, (cx, h // 2), (w // 6, h // 2 - 5), 0, 0, 360, 110, -1)  # soft tissue
    cv2.rectangle(img, (cx - w // 20, 10), (cx + w // 20, h - 10), 220, -1)  # bone
    return cv2.GaussianBlur(img, (0, 0), 3)


def _cross_section(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    img = np.zeros((h, w), np.uint8)
    cv2.ellipse(img, (w // 2, h // 2), (int(w * 0.42), int(h * 0.3)), 0, 0, 360, 150, -1)
    for side in (-1, 1):
        c = (w // 2 + side * int(w * 0.18), h // 2)
        cv2.ellipse(img, c, (int(w * 0.13), int(h * 0.2)), 0, 0, 360, int(rng.integers(0, 30)), -1)
    cv2.circle(img, (w // 2, int(h * 0.7)), int(w * 0.04), 240, -1)  # spine
    return cv2.GaussianBlur(img, (0, 0), 1.5)


def _shapes(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    img = np.full((h, w), int(rng.integers(0, 255)), np.uint8)
    for _ in range(rng.integers(2, 10)):
        p1 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        p2 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        cv2.rectangle(img, p1, p2, int(rng.integers(0, 255)), -1)
    return img


def generate(kind: str, seed: int, height: int = 320, width: int = 320) -> np.ndarray:
    """One 8-bit grayscale image of the given kind."""
    rng = np.random.default_rng(seed)
    h, w = height, width
    if kind == "document":
        return _document(rng, h, w)
    if kind == "photo":
        return _photo(rng, h, w)
    if kind == "noise":
        return rng.integers(0, 256, (h, w), dtype=np.uint8)
    if kind == "blank":
        return np.full((h, w), int(rng.integers(0, 256)), np.uint8)
    if kind == "gradient":
        return np.tile(np.linspace(0, 255, w, dtype=np.float32), (h, 1)).astype(np.uint8)
    if kind == "limb":
        return _limb(rng, h, w)
    if kind == "cross_section":
        return _cross_section(rng, h, w)
    if kind == "shapes":
        return _shapes(rng, h, w)
    raise ValueError(f"unknown kind {kind!r}; choose from {KINDS}")


def chest_film(seed: int, height: int = 300, width: int = 256) -> np.ndarray:
    """A generated frontal 'chest film': a body on a dark ground, two dark lung fields with
    ribs, spine and heart, blur and noise.  Varied but deterministic, and close enough to a film
    that the bundled lung segmenter finds both fields (``lung_boxes`` says where they are)."""
    rng = np.random.default_rng(seed)
    h, w = height, width
    img = np.full((h, w), rng.uniform(5, 30), np.float32)
    body = float(rng.uniform(150, 190))
    cv2.ellipse(img, (w // 2, int(h * 0.62)), (int(w * 0.46), int(h * 0.62)), 0, 0, 360, body, -1)
    for cx, cy, ax, ay in lung_ellipses(rng, h, w):
        cv2.ellipse(img, (cx, cy), (ax, ay), 0, 0, 360, float(rng.uniform(50, 90)), -1)
    rib = max(2, round(min(h, w) / 90))
    for k in range(8):  # ribs, drawn thick enough to survive downscaling
        y = int(h * (0.22 + 0.065 * k))
        for start, end in ((180, 270), (270, 360)):
            cv2.ellipse(img, (w // 2, y), (int(w * 0.38), int(h * 0.05)), 0, start, end, 125.0, rib)
    heart = (int(w * 0.56), int(h * 0.66))
    cv2.ellipse(
        img, heart, (int(w * 0.14), int(h * 0.12)), 0, 0, 360, float(rng.uniform(170, 200)), -1
    )
    cv2.rectangle(img, (int(w * 0.47), 0), (int(w * 0.53), h), 200.0, -1)  # spine
    texture = cv2.resize(rng.normal(0, 1, (24, 24)).astype(np.float32), (w, h))
    img += 12.0 * texture  # vessels and soft tissue: real lung fields are not flat
    img = cv2.GaussianBlur(img, (0, 0), max(0.5, 2.0 * min(h, w) / 256))
    img += rng.normal(0, rng.uniform(3, 10), img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def lung_ellipses(rng: np.random.Generator, h: int, w: int) -> list[tuple[int, int, int, int]]:
    """(centre x, centre y, half-width, half-height) of the two lung fields of a film."""
    out = []
    for side in (-1, 1):
        cx = w // 2 + side * int(w * rng.uniform(0.18, 0.22))
        cy = int(h * rng.uniform(0.42, 0.48))
        out.append((cx, cy, int(w * rng.uniform(0.13, 0.17)), int(h * rng.uniform(0.26, 0.32))))
    return out


def lung_box(seed: int, height: int = 300, width: int = 256) -> tuple[float, float, float, float]:
    """The box (x0, y0, x1, y1, fractions) around the lung fields :func:`chest_film` draws."""
    rng = np.random.default_rng(seed)
    rng.uniform(5, 30)
    rng.uniform(150, 190)  # the same draws as chest_film, in its order
    ellipses = lung_ellipses(rng, height, width)
    x0 = min(cx - ax for cx, _, ax, _ in ellipses) / width
    x1 = max(cx + ax for cx, _, ax, _ in ellipses) / width
    y0 = min(cy - ay for _, cy, _, ay in ellipses) / height
    y1 = max(cy + ay for _, cy, _, ay in ellipses) / height
    return x0, y0, x1, y1


def png_bytes(img: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", img)
    if not ok:
        raise ValueError("PNG encoding failed")
    return buf.tobytes()
