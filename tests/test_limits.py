"""Disk and memory limits: a full blob store answers ``507 storage_full``, a full database
``503 database_full``, both with Retry-After, and neither loses what was accepted before; a pool
process over ``CXR_WORKER_MAX_MEMORY_MB`` is replaced between chunks, never inside one.

Invariant: the faults are real.  The blob store fills a real file system (a 2 MiB tmpfs mounted
for the test; skipped, saying why, where mounting is not permitted), S3's "full" is what a real
HTTP endpoint answers, the database's is SQLite's own SQLITE_FULL (``PRAGMA max_page_count``),
and the memory limit is enforced by a real Celery worker on a real pool process.
"""

from __future__ import annotations

import errno
import http.server
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import event, func, select

from shared.migrate import upgrade
from shared.models import Chunk, Image, ImageStatus, Job
from shared.queue import make_celery
from shared.settings import load_settings
from shared.storage import (
    BlobStoreFullError,
    LocalBlobStore,
    S3BlobStore,
    blob_key,
)
from tests.factories import png_bytes, png_files, post_files, submit, with_key
from tests.service_client import assert_exactly_one_outcome, wait_for


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    """SQLite only: its page limit makes a real "database or disk is full" (PostgreSQL would
    need a tablespace on a small disk of the server's own)."""
    url = f"sqlite:///{tmp_path / 'cxr.db'}"
    upgrade(url)
    return url


def _mount(where: Path, options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 2 MiB file system (tmpfs) for this test alone."""
    where = tmp_path / "small-disk"
    where.mkdir()
    try:
        mounted = _mount(where, "size=2m")
    except FileNotFoundError:
        pytest.skip("no mount command: a small file system cannot be made here")
    if mounted.returncode != 0:
        pytest.skip(
            "mounting a 2 MiB tmpfs is not permitted here (it needs root or CAP_SYS_ADMIN): "
            f"{mounted.stderr.strip()}"
        )
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False, capture_output=True)


def _grow(disk: Path, size: str) -> None:
    """An operator makes room (tmpfs grows in place, keeping its files)."""
    grown = _mount(disk, f"remount,size={size}")
    assert grown.returncode == 0, grown.stderr


def _leftovers(root: Path) -> list[Path]:
    return list(root.rglob(".tmp-*"))


def _fill(store: LocalBlobStore) -> tuple[dict[str, bytes], bytes]:
    """Store ~200 KB films until one does not fit: (those stored, the one that did not)."""
    stored: dict[str, bytes] = {}
    for seed in range(100):  # ~20 MB: far more than 2 MiB
        data = png_bytes(seed, height=600, width=512)
        try:
            stored[store.put(data)] = data
        except BlobStoreFullError:
            return stored, data
    raise AssertionError("the small disk never filled up")


def test_a_full_disk_raises_blob_store_full_and_keeps_no_partial_file(small_disk: Path) -> None:
    store = LocalBlobStore(small_disk)
    stored, rejected = _fill(store)
    assert len(stored) >= 5  # it filled up on the way, not at once
    with pytest.raises(BlobStoreFullError) as info:
        store.put(rejected)
    assert info.value.errno == errno.ENOSPC
    assert not _leftovers(small_disk)  # the failed writes' temp files are gone
    for key, data in stored.items():
        assert store.get(key) == data  # what was stored before stays whole


def test_a_full_blob_disk_answers_507_and_commits_nothing_of_the_job(
    small_disk: Path, service_env: dict[str, str], api_key: str, db_sessions
) -> None:
    from api import create_app

    app = create_app(load_settings({**service_env, "CXR_BLOB_DIR": str(small_disk)}))
    client = with_key(app.test_client(), api_key)
    try:
        before = submit(client, png_files(3, seed=500))
        big = [(f"{k}.png", png_bytes(k, height=600, width=512)) for k in range(20)]  # ~4 MB
        resp = post_files(client, big, headers={"Idempotency-Key": "big-one"})
        assert resp.status_code == 507, resp.get_json()
        assert resp.get_json()["error"]["code"] == "storage_full"
        assert int(resp.headers["Retry-After"]) > 0
        with db_sessions() as session:  # the job that hit the full disk left no row behind
            assert session.scalars(select(Job.id)).all() == [before["id"]]
            assert session.scalar(select(func.count()).select_from(Image)) == 3
        stored_keys = {p.name for p in small_disk.rglob("*") if p.is_file()}
        assert {blob_key(d) for _, d in png_files(3, seed=500)} <= stored_keys
        assert not _leftovers(small_disk)

        _grow(small_disk, "16m")
        again = post_files(client, big, headers={"Idempotency-Key": "big-one"})
        assert again.status_code == 202, again.get_json()
        assert again.get_json()["image_count"] == 20
    finally:
        from api.extensions import service

        with app.app_context():
            service.state.engine.dispose()


def test_a_full_database_answers_503_database_full_and_keeps_committed_jobs(
    app, client, db_sessions
) -> None:
    from api.extensions import service

    first = submit(client, png_files(2, seed=900))
    with app.app_context():
        engine = service.state.engine
    with db_sessions() as session:
        pages = session.connection().exec_driver_sql("PRAGMA page_count").scalar()

    def no_room_to_grow(dbapi_conn, _record) -> None:
        dbapi_conn.execute(f"PRAGMA max_page_count={pages}")

    event.listen(engine, "connect", no_room_to_grow)
    engine.dispose()  # every connection from now on has the limit
    try:
        resp = post_files(client, png_files(60, seed=1000), headers={"Idempotency-Key": "k1"})
    finally:
        event.remove(engine, "connect", no_room_to_grow)
        engine.dispose()
    assert resp.status_code == 503, resp.get_json()
    assert resp.get_json()["error"]["code"] == "database_full"
    assert int(resp.headers["Retry-After"]) > 0
    with db_sessions() as session:
        assert session.scalars(select(Job.id)).all() == [first["id"]]
        assert session.scalar(select(func.count()).select_from(Image)) == 2
    again = post_files(client, png_files(60, seed=1000), headers={"Idempotency-Key": "k1"})
    assert again.status_code == 202, again.get_json()  # room again: the retry is accepted


class _FullS3(http.server.BaseHTTPRequestHandler):
    """An S3 endpoint whose drives are full, as MinIO answers then."""

    def do_PUT(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = (
            b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>XMinioStorageFull</Code>'
            b"<Message>Storage backend has reached its minimum free drive threshold.</Message>"
            b"</Error>"
        )
        self.send_response(507)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: object) -> None:
        pass


def test_a_full_s3_store_raises_blob_store_full() -> None:
    boto3 = pytest.importorskip("boto3", reason="boto3 is not installed")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FullS3)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = boto3.client(
            "s3",
            endpoint_url=f"http://127.0.0.1:{server.server_port}",
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        with pytest.raises(BlobStoreFullError):
            S3BlobStore(client, "bucket").put(b"a film")
    finally:
        server.shutdown()


def test_the_memory_limit_setting_reaches_celery() -> None:
    default = make_celery(load_settings({}))
    assert default.conf.worker_max_memory_per_child == 3000 * 1024  # KiB
    off = make_celery(load_settings({"CXR_WORKER_MAX_MEMORY_MB": "0"}))
    assert off.conf.worker_max_memory_per_child is None


@pytest.mark.integration
def test_a_worker_over_its_memory_limit_is_replaced_between_chunks(
    client, db_sessions, database_url, start_worker
) -> None:
    """1 MiB: every pool process is over it once it has loaded the model, so each is replaced
    after one chunk; no chunk is interrupted."""
    worker = start_worker(CXR_WORKER_MAX_MEMORY_MB="1")
    first_pool = set(worker.children())
    assert first_pool
    job = submit(client, png_files(8, seed=40))["id"]  # 2 chunks of 4

    def done() -> bool:
        with db_sessions() as session:
            statuses = session.scalars(select(Image.status).where(Image.job_id == job)).all()
        return all(s == ImageStatus.COMPLETED for s in statuses)

    wait_for(done, 180, "the job to complete")
    assert assert_exactly_one_outcome(database_url, [job]) == {ImageStatus.COMPLETED: 8}
    with db_sessions() as session:
        assert set(session.scalars(select(Image.attempts).where(Image.job_id == job))) == {0}
        assert set(session.scalars(select(Chunk.attempts).where(Chunk.job_id == job))) == {1}
    # a fresh process loaded the model for the second chunk (billiard's own notice of the
    # recycling does not reach our log)
    assert worker.log().count("worker.resources: model") >= 2
    wait_for(lambda: worker.children(), 60, "a fresh pool process")
    assert not first_pool & set(worker.children())
    assert worker.alive
