"""Generated test images and archives (no real X-rays: those live outside the repository)."""

from __future__ import annotations

import io
import zipfile

import cv2
import numpy as np

from ml.synthetic import chest_film

#: The generated frontal film (ml/synthetic.py holds every generated image, for benchmarks too).
xray_like = chest_film


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
