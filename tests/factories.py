"""Generated test images and archives (no real X-rays: those live outside the repository)."""

from __future__ import annotations

import io
import zipfile

import cv2
import numpy as np


def xray_like(seed: int, height: int = 300, width: int = 256) -> np.ndarray:
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
    """The box (x0, y0, x1, y1, fractions) around the lung fields :func:`xray_like` draws."""
    rng = np.random.default_rng(seed)
    rng.uniform(5, 30)
    rng.uniform(150, 190)  # the same draws as xray_like, in its order
    ellipses = lung_ellipses(rng, height, width)
    x0 = min(cx - ax for cx, _, ax, _ in ellipses) / width
    x1 = max(cx + ax for cx, _, ax, _ in ellipses) / width
    y0 = min(cy - ay for _, cy, _, ay in ellipses) / height
    y1 = max(cy + ay for _, cy, _, ay in ellipses) / height
    return x0, y0, x1, y1


def encode(img: np.ndarray, ext: str = ".png") -> bytes:
    ok, buf = cv2.imencode(ext, img)
    assert ok
    return buf.tobytes()


def png_bytes(seed: int, **kwargs: int) -> bytes:
    return encode(xray_like(seed, **kwargs), ".png")


def jpeg_bytes(seed: int, **kwargs: int) -> bytes:
    return encode(xray_like(seed, **kwargs), ".jpg")


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def zip_bytes(entries: dict[str, bytes], **zinfo: int) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            info = zipfile.ZipInfo(name)
            info.compress_type = zipfile.ZIP_DEFLATED
            for key, value in zinfo.items():
                setattr(info, key, value)
            zf.writestr(info, data)
    return buf.getvalue()


def mark_encrypted(archive: bytes) -> bytes:
    """Set the 'encrypted' flag on every entry (Python's zipfile cannot write encrypted zips)."""
    data = bytearray(archive)
    for magic, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        start = 0
        while (at := data.find(magic, start)) != -1:
            data[at + offset] |= 0x01
            start = at + 4
    return bytes(data)


def png_declaring(width: int, height: int) -> bytes:
    """A valid, tiny PNG whose header declares ``width`` x ``height`` (a decompression bomb)."""
    import struct
    import zlib

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 1024))
        + chunk(b"IEND", b"")
    )


def make_job(
    sessions,
    blobs,
    images: list[bytes],
    chunk_size: int = 32,
    **chunk_fields: object,
) -> tuple[str, list[str], list[str]]:
    """Rows for one job as the API would write them; returns (job id, chunk ids, image ids)."""
    from shared.models import Chunk, Image, Job, new_id

    job = Job(id=new_id(), model_version="test", image_count=len(images))
    chunks = [
        Chunk(id=new_id(), job_id=job.id, **chunk_fields)
        for _ in range(max(1, -(-len(images) // chunk_size)))
    ]
    rows = [
        Image(
            id=new_id(),
            job_id=job.id,
            chunk_id=chunks[n // chunk_size].id,
            position=n,
            filename=f"image-{n}.png",
            blob_key=blobs.put(data),
            size_bytes=len(data),
        )
        for n, data in enumerate(images)
    ]
    with sessions.begin() as session:
        session.add(job)
        session.flush()
        session.add_all(chunks)
        session.flush()
        session.add_all(rows)
    return job.id, [c.id for c in chunks], [r.id for r in rows]
