"""One submitted file → one stored ``Image`` row, whatever door it came through (multipart
upload, zip entry, DICOMweb STOW-RS, or a worker pulling from the PACS).

Invariant: what reaches the blob store is never identifying.  A DICOM file is de-identified
first (shared/dicom.deidentify keeps only what decoding and the scope check need) and its
Study/Series/SOP Instance UIDs go to their own columns; a DICOM file that cannot be
de-identified is not stored at all, and its image is ``failed`` at the door.  Any file whose
header is unreadable or declares too many pixels is ``failed`` at the door too, never enqueued.

The patient's age is the one scope rule decided here rather than by the worker: it is read from
the ORIGINAL header (the de-identified file holds no age or date, so the worker could not), and
a film of a patient under 18 is ``skipped`` at the door (``pediatric_not_supported``) with
nothing of it stored, neither pixels nor age: only its UIDs, to answer the PACS, and the
reason.  A door-skipped image, like a door-failed one, is terminal at once and belongs to no
chunk (shared/planning.py), so the job still ends.  The other header rules (modality, view,
body part) read attributes the de-identified file keeps, and stay the worker's.
"""

from __future__ import annotations

from shared.dicom import deidentify, header_scope, is_dicom
from shared.imaging import ImageError, OutOfScopeError, PediatricNotSupportedError, check_header
from shared.models import Image, ImageStatus, new_id
from shared.storage import BlobStore

#: What a refused DICOM file is stored as: nothing (its original bytes may identify a patient).
NOTHING = b""


def refuse(image: Image, exc: ImageError) -> Image:
    """End the image at the door with the reason: ``skipped`` for an out-of-scope code (a
    readable film the model must not score), ``failed`` for any other."""
    skip = isinstance(exc, OutOfScopeError)
    image.status = ImageStatus.SKIPPED if skip else ImageStatus.FAILED
    image.error_code, image.error_message = exc.code, exc.message
    return image


def ingest(
    blobs: BlobStore, job_id: str, position: int, filename: str, data: bytes, max_pixels: int
) -> Image:
    """Store one file and describe it as an image row (queued, or failed or skipped with its
    reason)."""
    image = Image(
        id=new_id(), job_id=job_id, position=position, filename=filename, status=ImageStatus.QUEUED
    )
    pediatric: OutOfScopeError | None = None
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
        # header_scope, not the age alone: a child's CT is not_chest_radiograph, as the worker
        # (and the same rule on a raw file, in training and `cxr evaluate`) would say
        refusal = header_scope(header)
        if isinstance(refusal, PediatricNotSupportedError):
            pediatric = refusal
    try:
        check_header(data, max_pixels)
    except ImageError as exc:  # checked before scope, in the same order as the raw file's path
        image.blob_key = blobs.put(data)
        return refuse(image, exc)
    if pediatric is not None:
        image.blob_key = blobs.put(NOTHING)
        return refuse(image, pediatric)
    image.blob_key = blobs.put(data)
    return image
