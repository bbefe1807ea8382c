"""Signed job callbacks (shared/callbacks.py, worker/callbacks.py, the create path and
``/v1/callback-secret``) with real parts: databases, Redis, Celery worker processes, and a local
HTTP receiver in a thread that checks each callback as a client's server would.

Only the name service is stood in for, where a test needs a name that resolves to a given
address (DNS rebinding, TLS to a name): a resolver function handed to ``deliver_callback``.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime as dt
import hashlib
import hmac
import json
import re
import signal
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import redis as redis_lib
import requests
from sqlalchemy import func, select, update

from shared.callbacks import (
    ATTEMPT_HEADER,
    DELIVERY_HEADER,
    EVENT,
    EVENT_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    delivery_id,
    mark_due,
    sign,
    verify_signature,
)
from shared.db import utcnow
from shared.models import CallbackStatus, Image, ImageStatus, Job
from shared.queue import CALLBACK_TASK, PACS_QUEUE, make_celery
from tests.factories import make_job, png_bytes, png_files, post_files, submit, submit_http
from tests.service_client import wait_done, wait_for
from worker.callbacks import (
    CONNECTION_FAILED,
    REJECTED,
    TIMEOUT,
    TLS_FAILED,
    callback_session,
    deliver_callback,
)
from worker.sweeper import sweep

SQLITE_ONLY = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
#: A file refused at the door: a job of these has ended the moment it is accepted.
UNREADABLE = [("not-a-film.png", b"nope")]


@pytest.fixture
def service_env(service_env: dict[str, str]) -> dict[str, str]:
    """This module's stacks: the loopback receiver allowed, short timeouts and backoff."""
    return {
        **service_env,
        "CXR_CALLBACK_ALLOWED_HOSTS": "127.0.0.1",
        "CXR_CALLBACK_TIMEOUT": "2",
        "CXR_CALLBACK_MAX_SECONDS": "30",
        "CXR_RETRY_BACKOFF_MAX": "1",
    }


class Receiver:
    """A client's callback endpoint on 127.0.0.1: records every request (path, headers, raw
    body) and answers with the scripted statuses in turn, then 200."""

    def __init__(self, answers: tuple[int, ...] = (), tls: ssl.SSLContext | None = None) -> None:
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.answers = list(answers)
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.requests.append((self.path, dict(self.headers), body))
                status = receiver.answers.pop(0) if receiver.answers else 200
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *_args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_port
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str = "/hook", host: str = "127.0.0.1", scheme: str = "http") -> str:
        return f"{scheme}://{host}:{self.port}{path}"

    def wait_for(self, n: int, timeout: float = 30) -> list[tuple[str, dict[str, str], bytes]]:
        wait_for(lambda: len(self.requests) >= n, timeout, f"{n} callback(s)")
        return self.requests

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def http(auth_headers: dict[str, str]) -> requests.Session:
    session = requests.Session()
    session.headers.update(auth_headers)
    return session


def resolving_to(*addresses: str):
    """A name service in which every name has these addresses."""

    def resolve(host: str, port: int, **_kw: object) -> list[tuple]:
        family = {True: socket.AF_INET6, False: socket.AF_INET}
        return [(family[":" in a], socket.SOCK_STREAM, 6, "", (a, port)) for a in addresses]

    return resolve


def ended_job(client, url: str) -> str:
    """A job accepted with ``url`` as its callback whose only file was refused at the door: it
    has ended, and its callback is due (its task waits in Redis: no worker here)."""
    return submit(client, UNREADABLE, callback_url=url)["id"]


def callback_of(sessions, job_id: str) -> Job:
    with sessions() as session:
        return session.get(Job, job_id)


def job_callback(http: requests.Session, url: str, job_id: str) -> dict:
    return http.get(f"{url}/v1/jobs/{job_id}", timeout=10).json()["callback"]


# ------------------------------------------------------------------------------ signatures


def test_a_signature_verifies_only_for_its_secret_body_and_recent_timestamp() -> None:
    body, now = b'{"id":"j"}', int(time.time())
    signature = sign("s3cret", now, body)
    assert signature.startswith("sha256=")
    assert verify_signature("s3cret", str(now), body, signature)
    assert not verify_signature("other", str(now), body, signature)
    assert not verify_signature("s3cret", str(now), body + b" ", signature)
    assert not verify_signature("s3cret", str(now + 1), body, signature)
    old = now - 301
    assert not verify_signature("s3cret", str(old), body, sign("s3cret", old, body))
    assert verify_signature("s3cret", str(old), body, sign("s3cret", old, body), tolerance_s=600)
    assert not verify_signature("s3cret", "12abc", body, signature)


def readme_verify_signature():
    """The receiver's function as the README prints it (Callbacks section)."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    match = re.search(r"\ndef verify_signature\(.*?\n(?=\n)", readme, re.S)
    assert match, "the README prints no verify_signature"
    scope = {"hashlib": hashlib, "hmac": hmac, "time": time}
    exec(match.group(0), scope)  # our own README's code, as a receiver would paste it
    return scope["verify_signature"]


def test_hostile_headers_make_verify_false_never_raise_here_and_in_the_readme() -> None:
    body, now = b'{"id":"j"}', int(time.time())
    good = sign("s3cret", now, body)
    hostile = [  # (timestamp, signature) as a receiver may get them from anyone
        ("\u00b2", good),  # "²".isdigit() is True, int("²") raises
        ("\u0661\u0662", good),  # Arabic-Indic digits: decimal, not ASCII
        (f"{now}\u00b2", good),
        (" " + str(now), good),
        ("", good),
        (str(now), "sha256=\u00e9" + good[8:]),  # compare_digest refuses non-ASCII str
        (str(now), "\udc80"),
        (str(now), ""),
    ]
    for verify in (verify_signature, readme_verify_signature()):
        for stamp, signature in hostile:
            assert verify("s3cret", stamp, body, signature) is False, (verify, stamp, signature)
        assert verify("s3cret", str(now), body, good) is True, verify


# --------------------------------------------------------------------------- at creation


REFUSED_AT_CREATION = [
    ("ftp://example.org/hook", "invalid_callback_url"),
    ("http://user:pw@example.org/hook", "invalid_callback_url"),
    ("hooks.example.org/no-scheme", "invalid_callback_url"),
    ("http://exa mple.org/", "invalid_callback_url"),
    ("", "invalid_callback_url"),
    ("http://10.1.2.3/hook", "callback_host_not_allowed"),  # private
    ("http://[::1]:8080/hook", "callback_host_not_allowed"),  # loopback, not the allowed one
    ("http://169.254.169.254/latest/meta-data", "callback_host_not_allowed"),  # link-local
    ("http://167772161/hook", "callback_host_not_allowed"),  # 10.0.0.1, written as a number
    ("https://224.0.0.1/", "callback_host_not_allowed"),  # multicast
]


@SQLITE_ONLY
def test_creation_refuses_a_disallowed_callback_url(client, db_sessions) -> None:
    for url, code in REFUSED_AT_CREATION:
        resp = post_files(client, png_files(1), callback_url=url)
        assert resp.status_code == 400, url
        assert resp.get_json()["error"]["code"] == code, url
    with db_sessions() as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 0


@SQLITE_ONLY
def test_by_default_only_public_addresses_are_accepted(settings, api_key) -> None:
    from api import create_app
    from tests.factories import with_key

    default = dataclasses.replace(settings, callback_allowed_hosts="")
    client = with_key(create_app(default).test_client(), api_key)
    for url in ("http://127.0.0.1:9000/hook", "http://localhost:9000/hook", "http://10.0.0.1/"):
        resp = post_files(client, png_files(1), callback_url=url)
        assert resp.get_json()["error"]["code"] == "callback_host_not_allowed", url
    job = submit(client, png_files(1), callback_url="https://93.184.215.14/hook?token=x")
    assert job["callback"] == {
        "url": "https://93.184.215.14/hook?token=x",
        "status": "pending",
        "attempts": 0,
        "error_code": None,
        "http_status": None,
        "delivered_at": None,
    }


@SQLITE_ONLY
def test_a_pull_job_takes_its_callback_url_in_the_json(client) -> None:
    resp = client.post(
        "/v1/jobs",
        json={"dicomweb": {"study_uids": ["1.2.3"]}, "callback_url": "gopher://example.org/"},
    )
    assert resp.status_code == 400
    assert resp.get_json()["error"]["code"] == "invalid_callback_url"


@SQLITE_ONLY
def test_a_job_without_callback_url_shows_none(client) -> None:
    assert submit(client, png_files(1))["callback"] is None


# --------------------------------------------------------------------- the secret endpoint


def test_each_client_reads_and_rotates_its_own_secret(client, app, db_sessions) -> None:
    from tests.factories import make_key, with_key

    first = client.get("/v1/callback-secret")
    assert first.status_code == 200
    assert first.headers["Cache-Control"] == "no-store"
    secret = first.get_json()["secret"]
    assert client.get("/v1/callback-secret").get_json()["secret"] == secret
    other = with_key(app.test_client(), make_key(db_sessions, "another-hospital"))
    assert other.get("/v1/callback-secret").get_json()["secret"] != secret
    rotated = client.post("/v1/callback-secret/rotate").get_json()["secret"]
    assert rotated != secret
    assert client.get("/v1/callback-secret").get_json()["secret"] == rotated
    anonymous = app.test_client().get("/v1/callback-secret")
    assert anonymous.status_code == 401


# ------------------------------------------------------------------------- exactly once


def test_exactly_one_of_many_racing_callers_makes_a_callback_due(db_sessions, settings) -> None:
    from shared.storage import LocalBlobStore

    job_id, _, (image_id,) = make_job(
        db_sessions, LocalBlobStore(settings.blob_path), [png_bytes(1)]
    )
    with db_sessions.begin() as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(callback_url="http://127.0.0.1:9/", callback_status=CallbackStatus.PENDING)
        )
        session.execute(
            update(Image).where(Image.id == image_id).values(status=ImageStatus.COMPLETED)
        )
    barrier = threading.Barrier(6)
    won: list[bool] = []

    def race() -> None:
        barrier.wait()
        with db_sessions.begin() as session:
            won.append(mark_due(session, job_id))

    threads = [threading.Thread(target=race) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(won) == [False] * 5 + [True]


def test_a_callback_waits_for_the_last_image(db_sessions, settings) -> None:
    from shared.storage import LocalBlobStore

    job_id, _, (first, _second) = make_job(
        db_sessions, LocalBlobStore(settings.blob_path), [png_bytes(1), png_bytes(2)]
    )
    with db_sessions.begin() as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(callback_url="http://127.0.0.1:9/", callback_status=CallbackStatus.PENDING)
        )
        session.execute(update(Image).where(Image.id == first).values(status=ImageStatus.FAILED))
    with db_sessions.begin() as session:
        assert not mark_due(session, job_id)  # one image still queued
    assert callback_of(db_sessions, job_id).callback_due_at is None


def pacs_queue(redis_url: str) -> list[tuple[str, str]]:
    """(task name, first argument) of each message waiting on the PACS queue."""
    out = []
    for raw in redis_lib.Redis.from_url(redis_url).lrange(PACS_QUEUE, 0, -1):
        message = json.loads(raw)
        args = json.loads(base64.b64decode(message["body"]))[0]
        out.append((message["headers"]["task"], args[0]))
    return out


def test_the_sweeper_sends_callbacks_that_fell_through(
    client, db_sessions, settings, redis_url
) -> None:
    job_id = ended_job(client, "http://127.0.0.1:9/hook")
    redis_lib.Redis.from_url(redis_url).delete(PACS_QUEUE)  # the message was lost
    with db_sessions.begin() as session:  # and a worker died before its check: never made due
        session.execute(
            update(Job).where(Job.id == job_id).values(callback_due_at=None, callback_next_at=None)
        )
    celery = make_celery(settings)
    sweep(celery, db_sessions, settings)
    assert pacs_queue(redis_url) == [(CALLBACK_TASK, job_id)]
    assert callback_of(db_sessions, job_id).callback_due_at is not None
    sweep(celery, db_sessions, settings)  # due now, and its message is on its way: not again
    assert len(pacs_queue(redis_url)) == 1
    redis_lib.Redis.from_url(redis_url).delete(PACS_QUEUE)  # lost again, long ago
    long_ago = utcnow() - dt.timedelta(seconds=settings.lease_seconds + 5)
    with db_sessions.begin() as session:
        session.execute(update(Job).where(Job.id == job_id).values(callback_next_at=long_ago))
    sweep(celery, db_sessions, settings)
    assert pacs_queue(redis_url) == [(CALLBACK_TASK, job_id)]


# ------------------------------------------------------------------- delivery, in process


@SQLITE_ONLY
def test_delivery_refuses_a_name_that_now_resolves_to_a_private_address(
    client, db_sessions, settings, receiver
) -> None:
    """DNS rebinding: the name passed at creation (names are not resolved then); at delivery
    it resolves to a private address, and nothing is sent anywhere."""
    job_id = ended_job(client, f"http://hooks.example.org:{receiver.port}/hook")
    outcome = deliver_callback(
        job_id, db_sessions, settings, callback_session(), resolve=resolving_to("10.0.0.7")
    )
    assert outcome.status == CallbackStatus.FAILED
    job = callback_of(db_sessions, job_id)
    assert (job.callback_error_code, job.callback_attempts) == ("callback_host_not_allowed", 1)
    assert receiver.requests == []


@SQLITE_ONLY
def test_delivery_connects_only_to_an_allowed_address_of_the_name(
    client, db_sessions, settings, receiver
) -> None:
    job_id = ended_job(client, f"http://hooks.example.org:{receiver.port}/hook")
    resolve = resolving_to("10.0.0.7", "127.0.0.1")  # the private one first
    outcome = deliver_callback(job_id, db_sessions, settings, callback_session(), resolve)
    assert outcome.status == CallbackStatus.DELIVERED
    ((_path, headers, _body),) = receiver.requests
    assert headers["Host"] == f"hooks.example.org:{receiver.port}"  # the name, not the address


@SQLITE_ONLY
def test_a_4xx_other_than_408_and_429_fails_at_once(client, db_sessions, settings) -> None:
    refusing = Receiver(answers=(410,))
    try:
        job_id = ended_job(client, refusing.url())
        outcome = deliver_callback(job_id, db_sessions, settings, callback_session())
    finally:
        refusing.close()
    assert outcome == (CallbackStatus.FAILED, None)
    job = callback_of(db_sessions, job_id)
    assert (job.callback_error_code, job.callback_http_status) == (REJECTED, 410)
    assert len(refusing.requests) == 1


def test_a_delivered_callback_is_never_sent_again(client, db_sessions, settings, receiver) -> None:
    job_id = ended_job(client, receiver.url())
    assert deliver_callback(job_id, db_sessions, settings, callback_session()).status == "delivered"
    with db_sessions.begin() as session:  # even when a duplicate task finds it due again
        session.execute(update(Job).where(Job.id == job_id).values(callback_next_at=utcnow()))
    assert deliver_callback(job_id, db_sessions, settings, callback_session()).status == "delivered"
    assert len(receiver.requests) == 1


def _self_signed(tmp_path: Path, name: str) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@SQLITE_ONLY
def test_tls_goes_to_the_checked_address_and_verifies_the_name(
    client, db_sessions, settings, tmp_path
) -> None:
    pytest.importorskip("cryptography", reason="cryptography makes the test's certificate")
    cert, key = _self_signed(tmp_path, "callback.test")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = Receiver(tls=context)
    try:
        trusting = callback_session()
        trusting.verify = str(cert)
        resolve = resolving_to("127.0.0.1")
        good = ended_job(client, server.url(host="callback.test", scheme="https"))
        assert deliver_callback(good, db_sessions, settings, trusting, resolve).status == (
            "delivered"
        )
        other, _ = _self_signed(tmp_path, "other.test")  # trusted, but for another name
        mismatched = callback_session()
        mismatched.verify = str(other)
        bad = ended_job(client, server.url(host="callback.test", scheme="https"))
        assert deliver_callback(bad, db_sessions, settings, mismatched, resolve).status == (
            "pending"
        )
        assert callback_of(db_sessions, bad).callback_error_code == TLS_FAILED
    finally:
        server.close()
    assert len(server.requests) == 1


# ------------------------------------------------------------- end to end, real workers


@pytest.mark.integration
@SQLITE_ONLY
def test_a_finished_job_posts_one_signed_summary(
    http, live_server, start_worker, receiver, settings, db_sessions
) -> None:
    worker = start_worker()
    url = receiver.url("/hooks/cxr?token=abc123")
    job = submit_http(http, live_server, png_files(6), data={"callback_url": url})
    assert job["callback"]["status"] == "pending"
    done = wait_done(http, live_server, job["id"], timeout=120)
    ((path, headers, body),) = receiver.wait_for(1)

    assert path == "/hooks/cxr?token=abc123"
    secret = http.get(f"{live_server}/v1/callback-secret", timeout=10).json()["secret"]
    stamp, signature = headers[TIMESTAMP_HEADER], headers[SIGNATURE_HEADER]
    assert verify_signature(secret, stamp, body, signature)
    assert not verify_signature(secret, stamp, body.replace(b"completed", b"failed"), signature)
    assert headers[EVENT_HEADER] == EVENT
    assert headers[ATTEMPT_HEADER] == "1"
    assert uuid.UUID(headers[DELIVERY_HEADER]) == uuid.UUID(delivery_id(job["id"]))
    summary = {k: v for k, v in done.items() if k not in ("images", "pagination", "callback")}
    assert json.loads(body) == summary
    assert b"0.png" not in body  # no filename (nor any other per-image data)

    state = wait_for(
        lambda: (s := job_callback(http, live_server, job["id"]))["status"] == "delivered" and s,
        30,
        "the delivery to be recorded",
    )
    assert (state["attempts"], state["http_status"], state["error_code"]) == (1, 200, None)
    sweep(make_celery(settings), db_sessions, settings)  # nothing is left for the sweeper
    time.sleep(1.5)
    assert len(receiver.requests) == 1
    assert "abc123" not in worker.log()
    assert secret not in worker.log()


@pytest.mark.integration
@SQLITE_ONLY
def test_a_receiver_that_fails_twice_gets_the_third_attempt(
    http, live_server, start_worker
) -> None:
    flaky = Receiver(answers=(503, 500))
    try:
        start_worker()
        job = submit_http(http, live_server, UNREADABLE, data={"callback_url": flaky.url()})
        requests_seen = flaky.wait_for(3)
        state = wait_for(
            lambda: (s := job_callback(http, live_server, job["id"]))["status"] != "pending" and s,
            30,
            "the callback to end",
        )
    finally:
        flaky.close()
    assert state["status"] == "delivered"
    assert (state["attempts"], state["http_status"], state["error_code"]) == (3, 200, None)
    assert [h[ATTEMPT_HEADER] for _, h, _ in requests_seen] == ["1", "2", "3"]
    assert len({h[DELIVERY_HEADER] for _, h, _ in requests_seen}) == 1
    assert len({b for _, _, b in requests_seen}) == 1  # the same body every time


@pytest.mark.integration
@SQLITE_ONLY
def test_a_receiver_that_never_answers_fails_within_the_bounded_time(
    http, live_server, start_worker
) -> None:
    silent = socket.create_server(("127.0.0.1", 0))  # accepts connections, never answers
    try:
        worker = start_worker(CXR_CALLBACK_MAX_SECONDS="3", CXR_CALLBACK_TIMEOUT="0.5")
        # the pool process takes its first task once its model is loaded: the bounded time
        # starts when the job ends, so let it end only when a worker can attempt at once
        wait_for(lambda: " loaded" in worker.log(), 120, "the worker's model")
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/hook"
        job = submit_http(http, live_server, UNREADABLE, data={"callback_url": url})
        started = time.monotonic()
        state = wait_for(
            lambda: (s := job_callback(http, live_server, job["id"]))["status"] != "pending" and s,
            30,
            "the callback to fail",
        )
        elapsed = time.monotonic() - started
    finally:
        silent.close()
    assert (state["status"], state["error_code"]) == ("failed", "callback_timeout")
    assert state["attempts"] >= 2
    # 3 s of retries, then the last attempt's 0.5 s and the scheduling around it
    assert elapsed < 3 + 0.5 + 4, elapsed


# ------------------------------------------------- bounded time, and one address per attempt


@SQLITE_ONLY
def test_a_callback_past_its_bounded_time_is_failed_not_sent(
    client, db_sessions, settings, receiver
) -> None:
    """Its attempts never recorded an outcome (a hanging receiver, a killed worker): the
    sweeper's resend finds CXR_CALLBACK_MAX_SECONDS spent and fails it."""
    job_id = ended_job(client, receiver.url())
    long_ago = utcnow() - dt.timedelta(seconds=settings.callback_max_seconds + 1)
    with db_sessions.begin() as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(callback_due_at=long_ago, callback_next_at=utcnow(), callback_attempts=3)
        )
    outcome = deliver_callback(job_id, db_sessions, settings, callback_session())
    assert outcome == (CallbackStatus.FAILED, None)
    job = callback_of(db_sessions, job_id)
    assert (job.callback_error_code, job.callback_attempts) == (TIMEOUT, 3)
    assert receiver.requests == []


class Trickler:
    """A receiver that answers one header line every 0.2 s and never ends its answer: no read
    waits long enough for CXR_CALLBACK_TIMEOUT."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        conn, _ = self.server.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\n")
            while not self.stop.wait(0.2):
                conn.sendall(b"X-Wait: 1\r\n")

    def close(self) -> None:
        self.stop.set()
        self.server.close()


@SQLITE_ONLY
def test_an_attempt_cut_off_by_the_soft_time_limit_counts_as_a_timeout(
    client, db_sessions, settings
) -> None:
    """Celery's soft time limit raises SoftTimeLimitExceeded from a signal handler in the
    middle of the POST; here SIGALRM's handler does the same after 1 s."""
    from celery.exceptions import SoftTimeLimitExceeded

    def soft_limit(*_args: object) -> None:
        raise SoftTimeLimitExceeded()

    trickler = Trickler()
    previous = signal.signal(signal.SIGALRM, soft_limit)
    try:
        job_id = ended_job(client, f"http://127.0.0.1:{trickler.port}/hook")
        signal.setitimer(signal.ITIMER_REAL, 1.0)
        outcome = deliver_callback(job_id, db_sessions, settings, callback_session())
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        trickler.close()
    assert outcome.status == CallbackStatus.PENDING
    assert outcome.retry_in is not None  # retried, within CXR_CALLBACK_MAX_SECONDS
    job = callback_of(db_sessions, job_id)
    assert (job.callback_error_code, job.callback_attempts) == (TIMEOUT, 1)


class Dropper:
    """Reads a request on ``host``:``port`` and closes the connection without answering."""

    def __init__(self, host: str, port: int) -> None:
        self.server = socket.create_server((host, port))
        self.requests = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.server.accept()
                with conn:
                    if conn.recv(65536):
                        self.requests += 1

    def close(self) -> None:
        self.server.close()


@SQLITE_ONLY
def test_the_next_address_is_tried_only_when_this_one_was_never_connected_to(
    client, db_sessions, settings, receiver
) -> None:
    """A connection dropped after the request went out: the receiver may have acted on it, so
    the attempt ends there; a refused connection sent nothing: the next address gets it."""
    loopback = dataclasses.replace(settings, callback_allowed_hosts="127.0.0.0/8")
    url = f"http://hooks.example.org:{receiver.port}/hook"
    try:
        dropper = Dropper("127.0.0.2", receiver.port)
    except OSError:
        pytest.skip("127.0.0.2 cannot be bound here (the loopback is not 127/8)")
    try:
        dropped = ended_job(client, url)
        outcome = deliver_callback(
            dropped,
            db_sessions,
            loopback,
            callback_session(),
            resolving_to("127.0.0.2", "127.0.0.1"),
        )
    finally:
        dropper.close()
    assert outcome.status == CallbackStatus.PENDING
    assert callback_of(db_sessions, dropped).callback_error_code == CONNECTION_FAILED
    assert (dropper.requests, receiver.requests) == (1, [])

    refused = ended_job(client, url)  # nothing listens on 127.0.0.3 at that port
    outcome = deliver_callback(
        refused, db_sessions, loopback, callback_session(), resolving_to("127.0.0.3", "127.0.0.1")
    )
    assert outcome.status == CallbackStatus.DELIVERED
    assert len(receiver.requests) == 1
