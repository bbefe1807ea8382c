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


# --------------------------------------------------------------------------- API clients and keys
# The one way the tests submit jobs and make API keys (``service_client`` polls a live stack).


def png_files(n: int, seed: int = 0, **kwargs: int) -> list[tuple[str, bytes]]:
    """``n`` generated films named ``0.png``, ``1.png``, ... (``seed`` shifts their content)."""
    return [(f"{k}.png", png_bytes(seed + k, **kwargs)) for k in range(n)]


def make_key(sessions, client: str, is_admin: bool = False, **limits: int | None) -> str:
    """A real API key for ``client`` in the database behind ``sessions`` (``limits``: its
    priority, max_images_in_flight, max_submissions_per_minute); returns the plaintext."""
    from shared.auth import create_key

    with sessions.begin() as session:
        return create_key(session, client, is_admin, **limits)[1]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def with_key(test_client, key: str):
    """A Flask test client that sends ``key`` with every request."""
    test_client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {key}"
    return test_client


def post_files(test_client, files: list[tuple[str, bytes]], headers=None, **form: str):
    """``POST /v1/jobs`` through a Flask test client: ``files`` as (name, bytes) in the field
    'files', ``form`` as further fields; returns the response, whatever its status."""
    data = {"files": [(io.BytesIO(content), name) for name, content in files], **form}
    return test_client.post(
        "/v1/jobs", data=data, content_type="multipart/form-data", headers=headers or {}
    )


def submit(test_client, files: list[tuple[str, bytes]], **form: str) -> dict:
    """``post_files`` that must be accepted (202); returns the new job."""
    resp = post_files(test_client, files, **form)
    assert resp.status_code == 202, resp.get_json()
    return resp.get_json()


def submit_http(http, url: str, files: list[tuple[str, bytes]], **kw) -> dict:
    """``POST /v1/jobs`` over real HTTP (a ``requests`` session) to the API at ``url``; it must
    be accepted (202); returns the new job."""
    resp = http.post(
        f"{url}/v1/jobs", files=[("files", (name, data)) for name, data in files], timeout=120, **kw
    )
    assert resp.status_code == 202, resp.text
    return resp.json()


def make_job(
    sessions,
    blobs,
    images: list[bytes],
    chunk_size: int = 32,
    job_fields: dict | None = None,
    **chunk_fields: object,
) -> tuple[str, list[str], list[str]]:
    """Rows for one job, planned as the API plans them (``job_fields``: e.g. its client and
    priority); returns (job id, chunk ids, image ids)."""
    from shared.models import Image, ImageStatus, Job, new_id
    from shared.planning import add_plan, plan_job

    job = Job(id=new_id(), model_version="test", **(job_fields or {}))
    rows = [
        Image(
            id=new_id(),
            job_id=job.id,
            position=n,
            filename=f"image-{n}.png",
            blob_key=blobs.put(data),
            status=ImageStatus.QUEUED,
        )
        for n, data in enumerate(images)
    ]
    plan = plan_job(job, rows, chunk_size, **chunk_fields)
    with sessions.begin() as session:
        add_plan(session, plan)
    return job.id, plan.chunk_ids, [r.id for r in rows]


def score(sessions, image_id: str, model_version: str, probability: float = 0.9) -> None:
    """Make an image ``completed`` with a result from ``model_version``, as a worker would."""
    from shared.db import utcnow
    from shared.models import Image, ImageStatus, Result

    with sessions.begin() as session:
        image = session.get(Image, image_id)
        image.status = ImageStatus.COMPLETED
        image.finished_at = utcnow()
        label = "covid" if probability >= 0.5 else "non-covid"
        session.add(
            Result(
                image_id=image_id,
                probability=probability,
                label=label,
                model_version=model_version,
            )
        )
