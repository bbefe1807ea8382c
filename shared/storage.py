"""Content-addressed blob store for uploaded images.

Keys are the sha256 of the bytes, so a retried upload stores nothing twice and a worker can
verify what it reads.  ``LocalBlobStore`` writes into a directory that API and workers share
(a volume across hosts); ``S3BlobStore`` keeps them in S3-compatible object storage, for hosts
that share no volume.  Invariant: ``get`` returns exactly the bytes whose sha256 is the key, or
raises ``BlobNotFoundError``, ``BlobCorruptError`` or another ``OSError`` (an unreachable store is
``BlobStoreUnavailableError``, which the worker retries as transient).  ``put`` either stores the
whole blob or raises; a store without room (a full disk, a quota) raises ``BlobStoreFullError``
and leaves no partial file behind.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from shared.settings import Settings


class BlobNotFoundError(KeyError):
    pass


class BlobCorruptError(OSError):
    pass


class BlobStoreUnavailableError(OSError):
    """The object store could not be reached or answered with a server error (transient)."""


class BlobStoreFullError(OSError):
    """The store has no room for a new blob: a full disk or quota (ENOSPC, EDQUOT), or an object
    store that says so.  Not weather: it lasts until an operator makes room."""


#: The errnos of a full file system or an exhausted quota.
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
#: What S3-compatible stores answer when they are full: MinIO's drive threshold (HTTP 507), its
#: bucket quota, Ceph RGW's quota.  AWS S3 itself has no such limit.
_S3_FULL_CODES = frozenset({"XMinioStorageFull", "XMinioAdminBucketQuotaExceeded", "QuotaExceeded"})


class BlobStore(Protocol):
    def put(self, data: bytes) -> str: ...
    def get(self, key: str) -> bytes: ...


def blob_key(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_key(key: str) -> str:
    if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
        raise BlobNotFoundError(key)
    return key


class LocalBlobStore:
    """``root/ab/cd/abcd...``; writes are atomic (temp file, fsync, rename)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        _check_key(key)
        return self.root / key[:2] / key[2:4] / key

    def put(self, data: bytes) -> str:
        key = blob_key(data)
        path = self._path(key)
        if path.exists():
            return key
        try:
            self._write(path, data)
        except OSError as exc:
            if exc.errno in _FULL_ERRNOS:
                raise BlobStoreFullError(exc.errno, f"no room for blob {key}") from exc
            raise
        return key

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)  # a full disk keeps no half-written blob
            raise

    def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError as exc:
            raise BlobNotFoundError(key) from exc
        if blob_key(data) != key:
            raise BlobCorruptError(f"blob {key} does not match its checksum")
        return data


class S3BlobStore:
    """``s3://bucket/prefix/ab/cd/abcd...`` in AWS S3 or a compatible store (MinIO, Ceph).

    A put of an existing key just writes the same bytes again (S3 PUTs are atomic).  botocore's
    own retries are few and its timeouts short, so an outage surfaces quickly as
    ``BlobStoreUnavailableError`` and the worker's retry policy takes over.
    """

    def __init__(self, client, bucket: str, prefix: str = "") -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")

    @classmethod
    def from_settings(cls, settings: Settings) -> S3BlobStore:
        import boto3
        from botocore.config import Config

        bucket, _, prefix = settings.blob_url.removeprefix("s3://").partition("/")
        client = boto3.client(
            "s3",
            endpoint_url=settings.s3_endpoint_url or None,
            region_name=settings.s3_region or None,
            aws_access_key_id=settings.s3_access_key_id or None,
            aws_secret_access_key=settings.s3_secret_access_key or None,
            config=Config(
                retries={"max_attempts": 2, "mode": "standard"},
                connect_timeout=5,
                read_timeout=30,
            ),
        )
        return cls(client, bucket, prefix)

    def object_key(self, key: str) -> str:
        _check_key(key)
        name = f"{key[:2]}/{key[2:4]}/{key}"
        return f"{self.prefix}/{name}" if self.prefix else name

    def put(self, data: bytes) -> str:
        key = blob_key(data)
        with _s3_errors(key):
            self.client.put_object(Bucket=self.bucket, Key=self.object_key(key), Body=data)
        return key

    def get(self, key: str) -> bytes:
        name = self.object_key(key)
        with _s3_errors(key):
            data = self.client.get_object(Bucket=self.bucket, Key=name)["Body"].read()
        if blob_key(data) != key:
            raise BlobCorruptError(f"blob {key} does not match its checksum")
        return data


@contextlib.contextmanager
def _s3_errors(key: str) -> Iterator[None]:
    """Map botocore's exceptions onto the store's: missing key, full, unavailable, other
    OSError."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except ClientError as exc:
        err = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if err.get("Code") in {"NoSuchKey", "404", "NotFound"}:
            raise BlobNotFoundError(key) from exc
        if status == 507 or err.get("Code") in _S3_FULL_CODES:  # before the 5xx: not transient
            raise BlobStoreFullError(errno.ENOSPC, f"blob {key}: S3 {err.get('Code')}") from exc
        if status >= 500 or err.get("Code") in {"SlowDown", "RequestTimeout"}:
            raise BlobStoreUnavailableError(f"blob {key}: S3 {err.get('Code')}") from exc
        raise OSError(f"blob {key}: S3 {err.get('Code')}") from exc
    except BotoCoreError as exc:  # connection refused/reset, timeouts, truncated bodies
        raise BlobStoreUnavailableError(f"blob {key}: {type(exc).__name__}") from exc


def blob_store(settings: Settings) -> BlobStore:
    """The configured store: S3 when ``CXR_BLOB_URL`` is set, else the local directory."""
    if settings.blob_url:
        return S3BlobStore.from_settings(settings)
    return LocalBlobStore(settings.blob_path)
