"""The streaming multipart/related reader behind STOW-RS (api/multipart_related.py)."""

from __future__ import annotations

import io

import pytest

from api.errors import APIError
from api.multipart_related import iter_parts
from api.uploads import Budget

BOUNDARY = "b0undary-42"


def body(parts: list[bytes], headers: bytes = b"Content-Type: application/dicom\r\n") -> bytes:
    out = b"preamble to ignore\r\n"
    for data in parts:
        out += b"--" + BOUNDARY.encode() + b"\r\n" + headers + b"\r\n" + data + b"\r\n"
    return out + b"--" + BOUNDARY.encode() + b"--\r\nepilogue"


class Trickle(io.RawIOBase):
    """A stream that hands out a few bytes per read, so boundaries straddle reads."""

    def __init__(self, data: bytes, step: int) -> None:
        self.data, self.step = data, step

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        out, self.data = self.data[: self.step], self.data[self.step :]
        return out


def parts_of(raw: bytes, step: int = 1 << 20, **limits: int) -> list:
    budget = Budget(limits.get("files", 100), limits.get("bytes", 1 << 30))
    return list(iter_parts(Trickle(raw, step), BOUNDARY, limits.get("part", 1 << 20), budget))


@pytest.mark.parametrize("step", [1, 7, 64, 1 << 20])
def test_parts_come_out_whole_however_the_stream_is_cut(step: int) -> None:
    # a payload holding CRLF, dashes and most of the boundary must not end its part
    tricky = b"\r\n--b0undary-4\r\n--" + bytes(range(256))
    parts = parts_of(body([b"first", tricky, b""]), step)
    assert [p.data for p in parts] == [b"first", tricky, b""]
    assert {p.content_type for p in parts} == {"application/dicom"}


def test_a_part_without_headers_is_read() -> None:
    assert [p.data for p in parts_of(body([b"x"], headers=b""))] == [b"x"]


def test_a_part_over_the_size_limit_is_refused_while_reading() -> None:
    with pytest.raises(APIError) as err:
        parts_of(body([b"a" * 5000]), step=100, part=1000)
    assert err.value.code == "file_too_large"


def test_too_many_parts_are_refused() -> None:
    with pytest.raises(APIError) as err:
        parts_of(body([b"a"] * 3), files=2)
    assert err.value.code == "too_many_files"


def test_the_request_byte_budget_is_enforced() -> None:
    with pytest.raises(APIError) as err:
        parts_of(body([b"a" * 3000] * 3), step=500, bytes=5000)
    assert err.value.code == "request_too_large"


@pytest.mark.parametrize(
    "raw",
    [
        b"no boundary at all",
        b"--" + BOUNDARY.encode() + b"\r\nContent-Type: x\r\n\r\nnever closed",
        b"--" + BOUNDARY.encode() + b"junk",
    ],
)
def test_malformed_bodies_are_a_bad_request(raw: bytes) -> None:
    with pytest.raises(APIError) as err:
        parts_of(raw)
    assert err.value.code == "bad_request"
