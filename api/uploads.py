"""Turning a multipart request into a list of named files, zips expanded, limits enforced.

Every refusal is an :class:`APIError` with a specific code.  Limits are checked while reading,
never after: a file or zip entry is read at most ``limit + 1`` bytes, whatever its header says.
"""

from __future__ import annotations

import io
import stat
import unicodedata
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import IO

from werkzeug.datastructures import FileStorage

from api.errors import APIError
from shared.settings import Settings

ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
MAX_FILENAME = 255


@dataclass
class Upload:
    filename: str
    data: bytes


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
        raise APIError(413, "file_too_large", f"{name!r} is larger than {limit} bytes")
    return data


def _zip_entries(data: bytes, zip_name: str, settings: Settings) -> Iterator[Upload]:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = archive.infolist()
    except (zipfile.BadZipFile, ValueError, EOFError) as exc:
        raise APIError(400, "invalid_zip", f"{zip_name!r} is not a readable zip archive") from exc
    total = 0
    with archive:
        for info in infos:
            if info.is_dir():
                continue
            path = PurePosixPath(info.filename.replace("\\", "/"))
            if path.is_absolute() or ".." in path.parts or ":" in path.parts[0]:
                raise APIError(
                    400, "unsafe_zip_entry", f"zip entry {info.filename!r} escapes the archive"
                )
            if stat.S_ISLNK(info.external_attr >> 16):
                raise APIError(
                    400, "unsafe_zip_entry", f"zip entry {info.filename!r} is a symbolic link"
                )
            if info.flag_bits & 0x1:
                raise APIError(
                    400, "encrypted_zip_entry", f"zip entry {info.filename!r} is encrypted"
                )
            if path.name.startswith(".") or "__MACOSX" in path.parts:
                continue  # resource forks and hidden files are not films
            if info.file_size > settings.max_file_bytes:
                raise APIError(
                    413,
                    "file_too_large",
                    f"zip entry {info.filename!r} is larger than {settings.max_file_bytes} bytes",
                )
            if info.compress_size and info.file_size / info.compress_size > settings.max_zip_ratio:
                raise APIError(
                    400,
                    "zip_bomb",
                    f"zip entry {info.filename!r} expands more than {settings.max_zip_ratio}x",
                )
            try:
                with archive.open(info) as member:
                    content = _read_limited(member, settings.max_file_bytes, info.filename)
            except (
                zipfile.BadZipFile,
                RuntimeError,
                NotImplementedError,
                EOFError,
                OSError,
            ) as exc:
                raise APIError(
                    400, "invalid_zip", f"zip entry {info.filename!r} cannot be read"
                ) from exc
            total += len(content)
            if total > settings.max_request_bytes:
                raise APIError(
                    413,
                    "request_too_large",
                    f"{zip_name!r} expands beyond {settings.max_request_bytes} bytes",
                )
            if content.startswith(ZIP_MAGIC):
                raise APIError(400, "nested_zip", f"zip entry {info.filename!r} is itself a zip")
            yield Upload(clean_filename(str(path), f"entry-{len(content)}"), content)


def collect_uploads(files: list[FileStorage], settings: Settings) -> list[Upload]:
    """The files of a submission, zips expanded, in the order they were sent."""
    uploads: list[Upload] = []
    for n, storage in enumerate(files):
        name = clean_filename(storage.filename, f"file-{n + 1}")
        data = _read_limited(storage.stream, settings.max_file_bytes, name)
        if data.startswith(ZIP_MAGIC) or name.lower().endswith(".zip"):
            if not data.startswith(ZIP_MAGIC):
                raise APIError(400, "invalid_zip", f"{name!r} is not a readable zip archive")
            uploads.extend(_zip_entries(data, name, settings))
        else:
            uploads.append(Upload(name, data))
        if len(uploads) > settings.max_files_per_job:
            raise APIError(
                413, "too_many_files", f"a job may hold at most {settings.max_files_per_job} images"
            )
    if not uploads:
        raise APIError(400, "no_files", "send one or more images (or a zip) in the field 'files'")
    return uploads
