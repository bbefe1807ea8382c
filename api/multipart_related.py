"""Streaming reader for ``multipart/related`` bodies (DICOMweb STOW-RS), one part at a time.

Werkzeug's form parser insists on ``Content-Disposition``, which STOW-RS parts do not carry, so
this reads the parts itself.  Invariant: it never holds more than one part (at most
``max_part_bytes``) plus one read buffer, and every limit is checked while reading, before the
part is complete.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

from api.errors import APIError, ErrorCode
from api.uploads import Budget

READ_SIZE = 256 * 1024
MAX_HEADER_BYTES = 16 * 1024


@dataclass
class Part:
    headers: dict[str, str]  # lower-cased names
    data: bytes

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "").split(";")[0].strip().lower()


def _malformed(why: str) -> APIError:
    return APIError(ErrorCode.BAD_REQUEST, f"malformed multipart/related body: {why}")


class _Reader:
    def __init__(self, stream: IO[bytes], budget: Budget) -> None:
        self.stream, self.budget = stream, budget
        self.buf = bytearray()  # appended to in place: a 64 MB part must not be copied per read
        self.eof = False

    def fill(self) -> bool:
        if self.eof:
            return False
        chunk = self.stream.read(READ_SIZE)
        if not chunk:
            self.eof = True
            return False
        self.budget.take_bytes(len(chunk))
        self.buf += chunk
        return True

    def until(self, marker: bytes, limit: int, too_long: APIError) -> bytes:
        """The bytes before ``marker`` (which is consumed), at most ``limit`` of them."""
        start = 0
        while True:
            at = self.buf.find(marker, start)
            if at != -1:
                if at > limit:
                    raise too_long
                out = bytes(self.buf[:at])
                del self.buf[: at + len(marker)]
                return out
            if len(self.buf) - len(marker) > limit:
                raise too_long
            start = max(0, len(self.buf) - len(marker) + 1)
            if not self.fill():
                raise _malformed("it ends inside a part")

    def peek(self, n: int) -> bytes:
        while len(self.buf) < n and self.fill():
            pass
        return bytes(self.buf[:n])

    def take(self, n: int) -> bytes:
        out = self.peek(n)
        del self.buf[:n]
        return out


def _headers(raw: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in raw.decode("latin-1").split("\r\n"):
        if not line.strip():
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise _malformed("a part header has no colon")
        headers[name.strip().lower()] = value.strip()
    return headers


def iter_parts(
    stream: IO[bytes], boundary: str, max_part_bytes: int, budget: Budget
) -> Iterator[Part]:
    """The body's parts in order; raises APIError on a malformed body or a broken limit."""
    reader = _Reader(stream, budget)
    delimiter = b"--" + boundary.encode("latin-1")
    reader.until(delimiter, 1024 * 1024, _malformed("no opening boundary"))  # the preamble
    while True:
        after = reader.take(2)
        if after == b"--":
            return  # the closing delimiter; the epilogue is ignored
        if after != b"\r\n":
            raise _malformed("a boundary is not followed by a line break")
        if reader.peek(2) == b"\r\n":  # a part without headers
            reader.take(2)
            head = b""
        else:
            head = reader.until(b"\r\n\r\n", MAX_HEADER_BYTES, _malformed("headers too long"))
        too_large = APIError(
            ErrorCode.FILE_TOO_LARGE, f"a part is larger than {max_part_bytes} bytes"
        )
        data = reader.until(b"\r\n" + delimiter, max_part_bytes, too_large)
        budget.take_files(1)
        yield Part(_headers(head), data)
