"""Turning a multipart request into named files, one at a time, zips expanded, limits enforced.

Every refusal is an :class:`APIError` with a specific code.  Limits are checked while reading,
never after: a file or zip entry is read at most ``limit + 1`` bytes, whatever its header says,
a zip's entries are counted before any is read, and one byte budget covers the whole request
(zips expanded).  Files are yielded one by one so the caller can store each and let it go.
"""

from __future__ import annotations

import io
import lzma
import stat
import unicodedata
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import IO

from werkzeug.datastructures import FileStorage

from api.errors import APIError, ErrorCode
from shared.settings import Settings

ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
MAX_FILENAME = 255


@dataclass
class Upload:
    filename: str
    data: bytes


@dataclass
class Budget:
    """What one request may hold: files, and bytes once its zips are expanded."""

    max_files: int
    max_bytes: int
    files: int = 0
    bytes: int = 0

    def take_files(self, n: int) -> None:
        self.files += n
        if self.files > self.max_files:
            raise APIError(
                ErrorCode.TOO_MANY_FILES, f"a job may hold at most {self.max_files} images"
            )

    def take_bytes(self, n: int) -> None:
        self.bytes += n
        if self.bytes > self.max_bytes:
            raise APIError(
                ErrorCode.REQUEST_TOO_LARGE, f"the request expands beyond {self.max_bytes} bytes"
            )


def clean_filename(name: str | None, fallback: str) -> str:
    """Printable, at most 255 characters; kept for display only, never used as a path."""
    name = unicodedata.normalize("NFC", name or "")
    name = "".join(ch for ch in name if ch.isprintable()).strip()
    if not name:
        return fallback
    if len(name) > MAX_FILENAME:
        suffix = PurePosixPath(name).suffix[:16]
        name = name[: MAX_FILENAME - len(suffix) - 1] + "~" + suffix
    return name


def _read_limited(stream: IO[bytes], limit: int, name: str) -> bytes:
    data = stream.read(limit + 1)
    if len(data) > limit:
        raise APIError(ErrorCode.FILE_TOO_LARGE, f"{name!r} is larger than {limit} bytes")
    return data


READ_ERRORS = (
    zipfile.BadZipFile,
    RuntimeError,
    NotImplementedError,
    EOFError,
    OSError,
    ValueError,
    zlib.error,
    lzma.LZMAError,
)


def _entry_path(info: zipfile.ZipInfo) -> PurePosixPath | None:
    """The entry's path inside the archive, or None for what is not a film (folders, hidden
    files, resource forks); refuses entries that escape, link or are encrypted."""
    if info.is_dir():
        return None
    path = PurePosixPath(info.filename.replace("\\", "/"))
    if not path.parts or path.is_absolute() or ".." in path.parts or ":" in path.parts[0]:
        raise APIError(
            ErrorCode.UNSAFE_ZIP_ENTRY, f"zip entry {info.filename!r} escapes the archive"
        )
    if stat.S_ISLNK(info.external_attr >> 16):
        raise APIError(
            ErrorCode.UNSAFE_ZIP_ENTRY, f"zip entry {info.filename!r} is a symbolic link"
        )
    if info.flag_bits & 0x1:
        raise APIError(ErrorCode.ENCRYPTED_ZIP_ENTRY, f"zip entry {info.filename!r} is encrypted")
    if path.name.startswith(".") or "__MACOSX" in path.parts:
        return None
    return path


def _read_entry(archive: zipfile.ZipFile, info: zipfile.ZipInfo, settings: Settings) -> bytes:
    """The entry's bytes, its declared size and ratio checked before any is inflated."""
    if info.file_size > settings.max_file_bytes:
        raise APIError(
            ErrorCode.FILE_TOO_LARGE,
            f"zip entry {info.filename!r} is larger than {settings.max_file_bytes} bytes",
        )
    if info.compress_size and info.file_size / info.compress_size > settings.max_zip_ratio:
        raise APIError(
            ErrorCode.ZIP_BOMB,
            f"zip entry {info.filename!r} expands more than {settings.max_zip_ratio}x",
        )
    try:
        with archive.open(info) as member:
            return _read_limited(member, settings.max_file_bytes, info.filename)
    except READ_ERRORS as exc:
        raise APIError(
            ErrorCode.INVALID_ZIP, f"zip entry {info.filename!r} cannot be read"
        ) from exc


def _zip_entries(
    data: bytes, zip_name: str, settings: Settings, budget: Budget
) -> Iterator[Upload]:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = archive.infolist()
    except READ_ERRORS as exc:
        raise APIError(
            ErrorCode.INVALID_ZIP, f"{zip_name!r} is not a readable zip archive"
        ) from exc
    with archive:
        budget.take_files(sum(1 for info in infos if not info.is_dir()))
        for info in infos:
            path = _entry_path(info)
            if path is None:
                continue
            content = _read_entry(archive, info, settings)
            budget.take_bytes(len(content))
            if content.startswith(ZIP_MAGIC):
                raise APIError(ErrorCode.NESTED_ZIP, f"zip entry {info.filename!r} is itself a zip")
            yield Upload(clean_filename(str(path), f"entry-{len(content)}"), content)


def iter_uploads(files: list[FileStorage], settings: Settings) -> Iterator[Upload]:
    """The files of a submission, zips expanded, in the order they were sent, one at a time."""
    budget = Budget(max_files=settings.max_files_per_job, max_bytes=settings.max_request_bytes)
    sent = 0
    for n, storage in enumerate(files):
        name = clean_filename(storage.filename, f"file-{n + 1}")
        data = _read_limited(storage.stream, settings.max_file_bytes, name)
        if data.startswith(ZIP_MAGIC) or name.lower().endswith(".zip"):
            if not data.startswith(ZIP_MAGIC):
                raise APIError(ErrorCode.INVALID_ZIP, f"{name!r} is not a readable zip archive")
            for upload in _zip_entries(data, name, settings, budget):
                sent += 1
                yield upload
        else:
            budget.take_files(1)
            sent += 1
            yield Upload(name, data)
    if not sent:
        raise APIError(
            ErrorCode.NO_FILES, "send one or more images (or a zip) in the field 'files'"
        )
