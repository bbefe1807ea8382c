"""One submitted file → one stored ``Image`` row, whatever door it came through (multipart
upload, zip entry, DICOMweb STOW-RS, or a worker pulling from the PACS).

Invariant: what reaches the blob store is never identifying.  A DICOM file is de-identified
first (shared/dicom.deidentify keeps only what decoding and the scope check need) and its
Study/Series/SOP Instance UIDs go to their own columns; a DICOM file that cannot be
de-identified is not stored at all, and its image is ``failed`` at the door.  Any file whose
header is unreadable or declares too many pixels is ``failed`` at the door too, never enqueued.
"""

from __future__ import annotations

from shared.dicom import deidentify, is_dicom
from shared.imaging import ImageError, check_header
from shared.models import Image, ImageStatus, new_id
from shared.storage import BlobStore

#: What a refused DICOM file is stored as: nothing (its original bytes may identify a patient).
NOTHING = b""


def refuse(image: Image, exc: ImageError) -> Image:
    image.status = ImageStatus.FAILED
    image.error_code, image.error_message = exc.code, exc.message
    return image


def ingest(
    blobs: BlobStore, job_id: str, position: int, filename: str, data: bytes, max_pixels: int
) -> Image:
    """Store one file and describe it as an image row (queued, or failed with its reason)."""
    image = Image(
        id=new_id(), job_id=job_id, position=position, filename=filename, status=ImageStatus.QUEUED
    )
    if is_dicom(data):
        try:
            data, header = deidentify(data, max_pixels)
        except ImageError as exc:
            image.blob_key = blobs.put(NOTHING)
            return refuse(image, exc)
        image.study_instance_uid = header.study_uid
        image.series_instance_uid = header.series_uid
        image.sop_instance_uid = header.sop_uid
        image.sop_class_uid = header.sop_class_uid
    image.blob_key = blobs.put(data)
    try:
        check_header(data, max_pixels)
    except ImageError as exc:
        return refuse(image, exc)
    return image
