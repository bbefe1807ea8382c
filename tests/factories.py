"""Generated test images and archives (no real X-rays: those live outside the repository)."""

from __future__ import annotations

import io
import zipfile

import cv2
import numpy as np


def xray_like(seed: int, height: int = 300, width: int = 256) -> np.ndarray:
    """A grayscale image with two dark 'lung fields' and noise: varied but deterministic."""
    rng = np.random.default_rng(seed)
    img = np.full((height, width), 180, np.float32)
    for cx in (0.3, 0.7):
        center = (int(width * cx), int(height * 0.5))
        axes = (int(width * rng.uniform(0.12, 0.2)), int(height * rng.uniform(0.25, 0.35)))
        cv2.ellipse(img, center, axes, 0, 0, 360, float(rng.uniform(40, 110)), -1)
    img += rng.normal(0, rng.uniform(5, 30), img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


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
