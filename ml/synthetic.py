"""Generated images that are *not* frontal chest radiographs, for the scope check.

Invariant: nothing here is made from a real film.  Each kind stands for something a hospital
batch really holds besides frontal chest films: documents and screenshots, photographs,
noise from a broken detector, blank frames, films of limbs, and round cross-sections that look
like a CT slice.  :func:`chest_film` is the one generated *frontal* film, for tests and
benchmarks, drawn so that the lung segmenter finds both fields.  Deterministic in ``seed``.
"""

from __future__ import annotations

from math import comb

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


# ------------------------------------------------------------------ ICU overlays on a frontal film

#: What an intensive-care film carries that a clinic PA film does not.  ``whiteout`` is one lung
#: field turned white (consolidation, effusion, collapse); ``position`` is the supine, rotated,
#: off-centre and magnified (AP) projection of a bedside film.
ICU_KINDS = ("ett", "cvc", "ng", "ecg", "pacer", "whiteout", "position")
ICU_DEVICES = ("ett", "cvc", "ng", "ecg", "pacer")


def _curve(control: list[tuple[float, float]], n: int = 48) -> np.ndarray:
    """Points of a Bezier curve with the given control points, (n, 2), in the same units."""
    c = np.asarray(control, np.float64)
    t = np.linspace(0.0, 1.0, n)
    k = len(c) - 1
    basis = np.stack([comb(k, i) * t**i * (1 - t) ** (k - i) for i in range(k + 1)], axis=1)
    return basis @ c


def _stroke(shape: tuple[int, int], pts: np.ndarray, thickness: int) -> np.ndarray:
    """A float layer in [0, 1] with an antialiased polyline through ``pts`` (pixels)."""
    layer = np.zeros(shape, np.uint8)
    cv2.polylines(
        layer, [np.round(pts).astype(np.int32)], False, 255, max(1, thickness), cv2.LINE_AA
    )
    return layer.astype(np.float32) / 255.0


def _tube(
    img: np.ndarray,
    rng: np.random.Generator,
    control: list[tuple[float, float]],
    width: float,
    stripe: bool,
) -> None:
    """A tube or line along a curve (control points as fractions of width, height), in place:
    a translucent wall brighter than what lies under it, and, where it has one, the bright
    radio-opaque stripe that makes a real tube visible."""
    h, w = img.shape
    size = min(h, w)
    pts = _curve([(x * w, y * h) for x, y in control])
    thick = max(1, round(width * size))
    wall = _stroke(img.shape, pts, thick)
    img += wall * float(rng.uniform(35, 80))
    line = _stroke(img.shape, pts + rng.uniform(-0.3, 0.3) * thick, max(1, thick // 4))
    if stripe or thick <= 2:
        np.maximum(img, line * float(rng.uniform(225, 255)), out=img)


def _ett(img: np.ndarray, rng: np.random.Generator) -> None:
    """Endotracheal tube: down the trachea from the top edge, tip above the carina."""
    x = 0.5 + rng.uniform(-0.03, 0.03)
    tip = rng.uniform(0.16, 0.3)
    _tube(
        img,
        rng,
        [
            (x + rng.uniform(-0.04, 0.04), -0.02),
            (x + rng.uniform(-0.02, 0.02), tip * 0.5),
            (x, tip),
        ],
        rng.uniform(0.02, 0.03),
        stripe=True,
    )


def _cvc(img: np.ndarray, rng: np.random.Generator) -> None:
    """Central venous line: jugular or subclavian entry, tip in the superior vena cava."""
    side = rng.choice((-1.0, 1.0))
    tip = (0.5 + side * rng.uniform(0.0, 0.05), rng.uniform(0.28, 0.4))
    if rng.random() < 0.5:  # internal jugular: from the neck, down
        start = (0.5 + side * rng.uniform(0.08, 0.15), -0.02)
        mid = (0.5 + side * rng.uniform(0.06, 0.1), 0.15)
    else:  # subclavian: from under the clavicle, across
        start = (0.5 + side * rng.uniform(0.3, 0.42), rng.uniform(0.12, 0.2))
        mid = (0.5 + side * rng.uniform(0.1, 0.2), rng.uniform(0.15, 0.22))
    _tube(img, rng, [start, mid, tip], rng.uniform(0.006, 0.012), stripe=rng.random() < 0.7)


def _ng(img: np.ndarray, rng: np.random.Generator) -> None:
    """Nasogastric tube: down the oesophagus behind the heart, below the diaphragm, into the
    stomach on the patient's left (the image's right)."""
    x = 0.5 + rng.uniform(-0.04, 0.04)
    _tube(
        img,
        rng,
        [
            (x, -0.02),
            (x + rng.uniform(-0.03, 0.03), 0.45),
            (x + rng.uniform(0.0, 0.05), 0.8),
            (x + rng.uniform(0.12, 0.22), rng.uniform(0.85, 1.02)),
        ],
        rng.uniform(0.006, 0.014),
        stripe=True,
    )


def _ecg(img: np.ndarray, rng: np.random.Generator) -> None:
    """ECG electrodes: bright press-studs on discs, at the shoulders and the lower chest, each
    with a lead that wanders off the film."""
    h, w = img.shape
    size = min(h, w)
    places = [(0.12, 0.1), (0.88, 0.1), (0.15, 0.78), (0.85, 0.8), (0.5, 0.9), (0.7, 0.65)]
    for i in rng.permutation(len(places))[: rng.integers(3, 6)]:
        px, py = places[i]
        cx, cy = (px + rng.uniform(-0.06, 0.06)) * w, (py + rng.uniform(-0.06, 0.06)) * h
        r = rng.uniform(0.018, 0.032) * size
        end = (rng.choice((-0.05, 1.05)) * w, rng.uniform(0, 1) * h)
        bend = (rng.uniform(0, 1) * w, rng.uniform(0, 1) * h)
        lead = _stroke(img.shape, _curve([(cx, cy), bend, end]), max(1, round(0.003 * size)))
        np.maximum(img, lead * float(rng.uniform(130, 220)), out=img)
        disc = np.zeros(img.shape, np.uint8)
        cv2.circle(disc, (round(cx), round(cy)), round(r), 255, -1, cv2.LINE_AA)
        img += disc.astype(np.float32) / 255.0 * float(rng.uniform(20, 50))
        stud = np.zeros(img.shape, np.uint8)
        cv2.circle(stud, (round(cx), round(cy)), max(1, round(r * 0.4)), 255, -1, cv2.LINE_AA)
        np.maximum(img, stud.astype(np.float32) / 255.0 * 250.0, out=img)


def _pacer(img: np.ndarray, rng: np.random.Generator) -> None:
    """A pacemaker or port box under a clavicle, with its lead to the heart."""
    h, w = img.shape
    size = min(h, w)
    side = rng.choice((-1.0, 1.0))
    cx, cy = (0.5 + side * rng.uniform(0.2, 0.32)) * w, rng.uniform(0.1, 0.22) * h
    bw, bh = rng.uniform(0.04, 0.06) * size, rng.uniform(0.03, 0.045) * size
    box = np.zeros(img.shape, np.uint8)
    cv2.ellipse(
        box,
        (round(cx), round(cy)),
        (round(bw), round(bh)),
        float(rng.uniform(-30, 30)),
        0,
        360,
        255,
        -1,
        cv2.LINE_AA,
    )
    box_f = cv2.GaussianBlur(box.astype(np.float32) / 255.0, (0, 0), 0.6)
    np.maximum(img, box_f * float(rng.uniform(235, 255)), out=img)
    heart = (rng.uniform(0.5, 0.62) * w, rng.uniform(0.55, 0.7) * h)
    bend = ((0.5 + side * 0.05) * w, rng.uniform(0.25, 0.35) * h)
    lead = _stroke(img.shape, _curve([(cx, cy), bend, heart]), max(1, round(0.006 * size)))
    np.maximum(img, lead * float(rng.uniform(215, 250)), out=img)


def _lung_regions(shape: tuple[int, int], lung_mask: np.ndarray | None) -> list[np.ndarray]:
    """The two lung fields (left and right of the image's midline) as boolean masks: from the
    segmenter's mask where one is given and it shows the side, else an ellipse where a
    frontal film usually has its lung."""
    h, w = shape
    out = []
    mask = None
    if lung_mask is not None:
        mask = cv2.resize(np.asarray(lung_mask, np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
        mask = mask >= 0.5
    for side in (0, 1):
        half = np.zeros(shape, bool)
        if side == 0:
            half[:, : w // 2] = True
        else:
            half[:, w // 2 :] = True
        if mask is not None and (mask & half).sum() >= 0.02 * h * w:
            out.append(mask & half)
            continue
        ellipse = np.zeros(shape, np.uint8)
        centre = (round(w * (0.3 if side == 0 else 0.7)), round(h * 0.45))
        cv2.ellipse(ellipse, centre, (round(0.15 * w), round(0.28 * h)), 0, 0, 360, 1, -1)
        out.append(ellipse.astype(bool))
    return out


def _whiteout(img: np.ndarray, rng: np.random.Generator, lung_mask: np.ndarray | None) -> None:
    """One lung field turned as white as the mediastinum, with some texture, soft edges and,
    sometimes, a fluid level (an effusion fills from the bottom up)."""
    h, w = img.shape
    size = min(h, w)
    region = _lung_regions(img.shape, lung_mask)[int(rng.integers(0, 2))].astype(np.uint8)
    grow = max(1, round(rng.uniform(0.01, 0.04) * size))
    region = cv2.dilate(region, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * grow + 1,) * 2))
    if rng.random() < 0.3:  # effusion: the lower part only, up to a level
        ys = np.nonzero(region.any(axis=1))[0]
        if len(ys):
            level = int(ys.min() + rng.uniform(0.3, 0.6) * (ys.max() - ys.min()))
            region[:level] = 0
    soft = cv2.GaussianBlur(region.astype(np.float32), (0, 0), max(1.0, 0.02 * size))
    bright = float(np.percentile(img, rng.uniform(88, 97)))
    texture = cv2.resize(rng.normal(0, 1, (12, 12)).astype(np.float32), (w, h))
    fill = bright + rng.uniform(4, 12) * texture + rng.normal(0, 3, img.shape)
    alpha = soft * float(rng.uniform(0.75, 0.95))
    img *= 1 - alpha
    img += alpha * fill


def _position(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Supine bedside projection: rotated (up to 15 degrees), off centre, magnified (AP: the
    chest is nearer the tube), sometimes with a shallower inspiration (shorter lungs)."""
    h, w = img.shape
    angle = float(rng.uniform(-15, 15))
    scale = float(rng.uniform(1.0, 1.2))
    m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, scale)
    squeeze = float(rng.uniform(0.9, 1.0))
    m[1, :2] *= squeeze
    m[1, 2] = m[1, 2] * squeeze + (1 - squeeze) * h / 2
    m[0, 2] += rng.uniform(-0.06, 0.06) * w
    m[1, 2] += rng.uniform(-0.06, 0.06) * h
    ground = float(np.percentile(img, 2))
    return cv2.warpAffine(
        img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=ground
    )


def icu_overlay(
    gray: np.ndarray,
    seed: int,
    kinds: tuple[str, ...] | list[str] = ICU_KINDS,
    lung_mask: np.ndarray | None = None,
) -> np.ndarray:
    """A frontal film (8-bit grayscale, real or generated) as an intensive-care film: the given
    ``kinds`` of :data:`ICU_KINDS` drawn on it, deterministic in ``seed``.

    Anatomy first (``whiteout``, in the place of the lung that ``lung_mask`` shows, any size;
    else an ellipse where a lung usually is), then the devices on top, then the projection
    (``position``), which moves the patient and the devices together.  The result is in memory
    only: nothing made from a real film is ever written into the repository.
    """
    unknown = set(kinds) - set(ICU_KINDS)
    if unknown:
        raise ValueError(f"unknown ICU overlay kinds {sorted(unknown)}; choose from {ICU_KINDS}")
    if gray.ndim != 2:
        raise ValueError("icu_overlay wants a 2-D grayscale film")
    rng = np.random.default_rng(seed)
    img = gray.astype(np.float32)
    if "whiteout" in kinds:
        _whiteout(img, rng, lung_mask)
    draw = {"ett": _ett, "cvc": _cvc, "ng": _ng, "ecg": _ecg, "pacer": _pacer}
    for kind in ICU_DEVICES:  # a fixed order: the same seed gives the same film
        if kind in kinds:
            draw[kind](img, rng)
    if "position" in kinds:
        img = _position(img, rng)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)
