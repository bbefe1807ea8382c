"""The blob store on S3-compatible object storage (moto's server mode): the store alone, then the
whole stack (API uploads to S3, a real worker reads from it), then an S3 outage mid-job.

Invariant: every test talks to a real HTTP S3 endpoint, never to an in-process mock of boto3.
"""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import requests

from shared.settings import load_settings
from shared.storage import (
    BlobCorruptError,
    BlobNotFoundError,
    BlobStoreUnavailableError,
    S3BlobStore,
    blob_key,
    blob_store,
)
from tests.factories import png_files, submit_http
from tests.service_client import assert_exactly_one_outcome, wait_done

moto_server = pytest.importorskip(
    "moto.server", reason="moto[server] is not installed (pip install -e '.[dev]')"
)
boto3 = pytest.importorskip("boto3", reason="boto3 is not installed")

CREDENTIALS = {
    "CXR_S3_REGION": "us-east-1",
    "CXR_S3_ACCESS_KEY_ID": "testing",
    "CXR_S3_SECRET_ACCESS_KEY": "testing",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class S3:
    endpoint: str
    server: object

    def client(self, endpoint: str | None = None):
        return boto3.client(
            "s3",
            endpoint_url=endpoint or self.endpoint,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

    def new_bucket(self) -> str:
        name = f"cxr-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str) -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]


def _start_moto(port: int):
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server


@pytest.fixture(scope="module")
def s3() -> Iterator[S3]:
    port = _free_port()
    server = _start_moto(port)
    yield S3(f"http://127.0.0.1:{port}", server)
    server.stop()


def _env(s3: S3, bucket: str, endpoint: str | None = None, prefix: str = "blobs") -> dict:
    return {
        "CXR_BLOB_URL": f"s3://{bucket}/{prefix}",
        "CXR_S3_ENDPOINT_URL": endpoint or s3.endpoint,
        **CREDENTIALS,
    }


@pytest.fixture
def bucket(s3: S3) -> str:
    return s3.new_bucket()


@pytest.fixture
def store(s3: S3, bucket: str) -> S3BlobStore:
    built = blob_store(load_settings(_env(s3, bucket)))
    assert isinstance(built, S3BlobStore)
    return built


# --- the store alone -----------------------------------------------------------------------


def test_put_get_round_trip_and_idempotent_put(s3: S3, bucket: str, store: S3BlobStore) -> None:
    data = b"\x89PNG not really" * 100
    key = store.put(data)
    assert key == blob_key(data)
    assert store.put(data) == key
    assert store.get(key) == data
    assert s3.keys(bucket) == [f"blobs/{key[:2]}/{key[2:4]}/{key}"]


def test_missing_key_is_blob_not_found(store: S3BlobStore) -> None:
    with pytest.raises(BlobNotFoundError):
        store.get(blob_key(b"never stored"))
    with pytest.raises(BlobNotFoundError):
        store.get("../not-a-key")


def test_overwritten_object_is_blob_corrupt(s3: S3, bucket: str, store: S3BlobStore) -> None:
    key = store.put(b"original bytes")
    s3.client().put_object(Bucket=bucket, Key=store.object_key(key), Body=b"tampered")
    with pytest.raises(BlobCorruptError):
        store.get(key)


def test_unreachable_store_raises_an_os_error_quickly(s3: S3) -> None:
    port = _free_port()
    server = _start_moto(port)
    endpoint = f"http://127.0.0.1:{port}"
    bucket = f"cxr-{uuid.uuid4().hex[:12]}"
    s3.client(endpoint).create_bucket(Bucket=bucket)
    store = blob_store(load_settings(_env(s3, bucket, endpoint)))
    key = store.put(b"stored while up")
    server.stop()
    for call in (lambda: store.get(key), lambda: store.put(b"written while down")):
        started = time.monotonic()
        with pytest.raises(BlobStoreUnavailableError) as info:
            call()
        assert isinstance(info.value, OSError)
        assert time.monotonic() - started < 15


def test_blob_url_is_validated() -> None:
    from shared.settings import SettingsError

    for bad in ("http://bucket/x", "s3://", "s3:///prefix", "bucket"):
        with pytest.raises(SettingsError, match="CXR_BLOB_URL"):
            load_settings({"CXR_BLOB_URL": bad})
    settings = load_settings({"CXR_BLOB_URL": "s3://b/p", "CXR_S3_SECRET_ACCESS_KEY": "hush"})
    assert "hush" not in repr(settings)


# --- the whole stack on S3 -----------------------------------------------------------------


@pytest.fixture
def stack_bucket(s3: S3) -> str:
    return s3.new_bucket()


@pytest.fixture
def service_env(service_env: dict[str, str], s3: S3, stack_bucket: str) -> dict[str, str]:
    return {**service_env, **_env(s3, stack_bucket), "CXR_RETRY_BACKOFF_MAX": "3"}


@pytest.fixture
def http(auth_headers: dict[str, str]) -> requests.Session:
    session = requests.Session()
    session.headers.update(auth_headers)
    return session


@pytest.mark.integration
def test_uploads_go_to_s3_and_a_worker_reads_them(
    s3: S3, stack_bucket: str, settings, http, live_server, start_worker, database_url
) -> None:
    files = png_files(6, seed=7)
    start_worker()
    job = submit_http(http, live_server, files)
    stored = s3.keys(stack_bucket)
    assert sorted(stored) == sorted(
        f"blobs/{k[:2]}/{k[2:4]}/{k}" for k in {blob_key(d) for _, d in files}
    )
    assert not settings.blob_path.exists() or not any(settings.blob_path.rglob("*"))
    body = wait_done(http, live_server, job["id"])
    assert body["counts"]["completed"] == 6, body["counts"]
    assert assert_exactly_one_outcome(database_url, [job["id"]]) == {"completed": 6}


@pytest.mark.integration
@pytest.mark.fault
def test_s3_unreachable_for_a_while(
    s3: S3, stack_bucket: str, service_env, http, live_server, start_worker, database_url
) -> None:
    """Workers reach S3 through a proxy that is cut after the upload: their reads fail, they
    retry (transient), and once S3 is back every image ends with exactly one result."""
    from tests.netfault import CuttableProxy

    port = int(s3.endpoint.rsplit(":", 1)[1])
    proxy = CuttableProxy(("127.0.0.1", port))
    try:
        worker = start_worker(CXR_S3_ENDPOINT_URL=f"http://127.0.0.1:{proxy.port}")
        proxy.cut()
        job = submit_http(http, live_server, png_files(12, seed=3))  # the API reaches S3 directly
        deadline = time.monotonic() + 60
        while (
            "transient BlobStoreUnavailableError" not in worker.log()
            and time.monotonic() < deadline
        ):
            time.sleep(0.5)
        assert "transient BlobStoreUnavailableError" in worker.log(), worker.log()[-3000:]
        time.sleep(4)
        proxy.restore()
        body = wait_done(http, live_server, job["id"], timeout=240)
        assert body["counts"]["completed"] == 12, body["counts"]
        assert assert_exactly_one_outcome(database_url, [job["id"]]) == {"completed": 12}
    finally:
        proxy.close()


def test_an_unreachable_store_is_a_503_at_the_api(s3: S3, service_env, api_key) -> None:
    """The client's upload is not its fault: 503 with Retry-After, never a 500."""
    from api import create_app
    from tests.factories import png_files, post_files, with_key

    port = _free_port()  # nothing listens there
    settings = load_settings({**service_env, **_env(s3, "nowhere", f"http://127.0.0.1:{port}")})
    client = with_key(create_app(settings).test_client(), api_key)
    resp = post_files(client, png_files(1))
    assert (resp.status_code, resp.get_json()["error"]["code"]) == (503, "storage_unavailable")
    assert resp.headers["Retry-After"] == "5"
