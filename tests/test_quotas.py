"""Backpressure (api/quotas.py): per-client limits and the service's overload answer.

Each refusal must carry Retry-After (whole seconds) and a stable code, store nothing (no blob,
no row), and leave the jobs already accepted as they were; a key's own limit beats the
setting's; ``cxr submit`` waits out a 429 and then succeeds.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select, update

from shared.db import utcnow
from shared.models import Chunk, Image, ImageStatus, Job
from tests.factories import make_key, png_bytes, png_files, post_files, submit, with_key

# Small limits for the whole module: 8 images in flight per client, 5 submissions a minute,
# 12 unfinished images in all; refusals ask for a retry after 1 s.
LIMITS = {
    "CXR_MAX_IMAGES_IN_FLIGHT": "8",
    "CXR_MAX_SUBMISSIONS_PER_MINUTE": "5",
    "CXR_MAX_QUEUE_IMAGES": "12",
    "CXR_QUOTA_RETRY_AFTER": "1",
}


@pytest.fixture
def service_env(service_env: dict[str, str]) -> dict[str, str]:
    return {**service_env, **LIMITS}


def stored(db_sessions, settings) -> tuple[int, int, int]:
    """(jobs, images, blob files): what a refused submission must leave unchanged."""
    with db_sessions() as session:
        jobs = session.scalar(select(func.count()).select_from(Job))
        images = session.scalar(select(func.count()).select_from(Image))
    blob_dir = Path(settings.blob_path)
    files = sum(1 for p in blob_dir.rglob("*") if p.is_file()) if blob_dir.exists() else 0
    return jobs, images, files


def assert_refused(resp, status: int, code: str) -> int:
    assert resp.status_code == status, resp.get_json()
    assert resp.get_json()["error"]["code"] == code
    retry_after = resp.headers["Retry-After"]
    assert retry_after.isdigit()
    assert int(retry_after) >= 1
    return int(retry_after)


def away_from_a_minute_boundary() -> None:
    """The per-minute counter is per clock minute: start a burst well inside one."""
    if time.time() % 60 > 55:
        time.sleep(61 - time.time() % 60)


def test_images_in_flight_answer_429_and_store_nothing(client, db_sessions, settings) -> None:
    accepted = submit(client, png_files(8))  # 0 in flight at the door: accepted
    before = stored(db_sessions, settings)
    resp = post_files(client, png_files(1, seed=50))
    assert assert_refused(resp, 429, "too_many_images_in_flight") == 1
    assert stored(db_sessions, settings) == before
    # the accepted job is as it was: all 8 images queued, in their chunks
    body = client.get(f"/v1/jobs/{accepted['id']}?per_page=0").get_json()
    assert body["counts"]["queued"] == 8
    with db_sessions() as session:
        chunks = session.scalars(select(Chunk.id).where(Chunk.job_id == accepted["id"])).all()
    assert len(chunks) == 2
    # once some finish, the client may send again
    with db_sessions.begin() as session:
        session.execute(
            update(Image)
            .where(Image.job_id == accepted["id"])
            .values(status=ImageStatus.COMPLETED, finished_at=utcnow())
        )
    submit(client, png_files(1, seed=50))


def test_a_keys_own_in_flight_limit_beats_the_setting(app, db_sessions) -> None:
    strict = with_key(app.test_client(), make_key(db_sessions, "strict", max_images_in_flight=2))
    other = with_key(app.test_client(), make_key(db_sessions, "other"))
    submit(strict, png_files(3))
    assert_refused(post_files(strict, png_files(1)), 429, "too_many_images_in_flight")
    submit(other, png_files(3))  # another client, the setting's 8: still room


def test_submissions_per_minute_answer_429_until_the_minute_ends(app, db_sessions) -> None:
    away_from_a_minute_boundary()
    slow = with_key(app.test_client(), make_key(db_sessions, "slow", max_submissions_per_minute=2))
    fast = with_key(app.test_client(), make_key(db_sessions, "fast", max_submissions_per_minute=7))
    for n in range(2):
        submit(slow, [(f"{n}.png", png_bytes(n))])
    retry_after = assert_refused(post_files(slow, png_files(1)), 429, "too_many_submissions")
    assert retry_after <= 60
    for n in range(6):  # more than the setting's 5: the key's 7 counts
        submit(fast, [(f"{n}.png", png_bytes(n))])


def test_the_default_rate_applies_without_an_override(client, db_sessions, settings) -> None:
    away_from_a_minute_boundary()
    for n in range(5):
        submit(client, [(f"{n}.png", png_bytes(n))])
    before = stored(db_sessions, settings)
    assert_refused(post_files(client, png_files(1)), 429, "too_many_submissions")
    assert stored(db_sessions, settings) == before


def test_an_overloaded_service_answers_503_on_every_door(app, db_sessions, settings) -> None:
    first = with_key(app.test_client(), make_key(db_sessions, "first"))
    second = with_key(app.test_client(), make_key(db_sessions, "second"))
    submit(first, png_files(8))
    submit(second, png_files(8))  # 8 unfinished at its door, under 12: accepted
    third = with_key(app.test_client(), make_key(db_sessions, "third"))
    before = stored(db_sessions, settings)
    assert_refused(post_files(third, png_files(1)), 503, "overloaded")
    pull = third.post("/v1/jobs", json={"dicomweb": {"study_uids": ["1.2.3"]}})
    assert_refused(pull, 503, "overloaded")
    stow = third.post(
        "/dicomweb/studies",
        data=b"--b\r\nContent-Type: application/dicom\r\n\r\nDICM\r\n--b--\r\n",
        content_type='multipart/related; type="application/dicom"; boundary=b',
    )
    assert_refused(stow, 503, "overloaded")
    assert stored(db_sessions, settings) == before


def test_a_replayed_submission_is_answered_over_the_limit(client) -> None:
    headers = {"Idempotency-Key": "batch-17"}
    first = post_files(client, png_files(8), headers=headers)
    assert first.status_code == 202
    again = post_files(client, png_files(8), headers=headers)
    assert again.status_code == 200
    assert again.get_json()["id"] == first.get_json()["id"]


def test_cxr_submit_waits_out_a_429_then_succeeds(
    app, live_server, db_sessions, tmp_path, capsys
) -> None:
    from cli.main import main

    key = make_key(db_sessions, "ward", max_images_in_flight=1)
    refused = threading.Event()

    @app.after_request
    def _watch(response):  # the test's eyes on the wire, not a stand-in for our code
        if response.status_code == 429:
            refused.set()
        return response

    held = submit(with_key(app.test_client(), key), png_files(1))["id"]

    def finish_the_held_job() -> None:  # as a worker would, once the CLI was refused
        if refused.wait(60):
            with db_sessions.begin() as session:
                session.execute(
                    update(Image)
                    .where(Image.job_id == held)
                    .values(status=ImageStatus.COMPLETED, finished_at=utcnow())
                )

    film = tmp_path / "film.png"
    film.write_bytes(png_bytes(7))
    helper = threading.Thread(target=finish_the_held_job)
    helper.start()
    code = main(["submit", str(film), "--url", live_server, "--api-key", key, "--retry-for", "30"])
    helper.join(10)
    out, err = capsys.readouterr()
    assert code == 0, err
    assert refused.is_set()
    assert "server busy (429 too_many_images_in_flight): retrying in" in err
    job_id = out.strip().splitlines()[0]
    with db_sessions() as session:
        assert session.scalar(select(func.count()).where(Image.job_id == job_id)) == 1


def test_cxr_submit_gives_up_after_retry_for(live_server, db_sessions, tmp_path, capsys) -> None:
    from cli.main import main

    key = make_key(db_sessions, "ward", max_images_in_flight=1)
    film = tmp_path / "film.png"
    film.write_bytes(png_bytes(7))
    args = ["submit", str(film), "--url", live_server, "--api-key", key]
    assert main([*args, "--retry-for", "0"]) == 0
    started = time.monotonic()
    assert main([*args, "--retry-for", "0"]) != 0  # still in flight: refused, no retry
    assert time.monotonic() - started < 5
    assert "too_many_images_in_flight" in capsys.readouterr().err


def test_cxr_keys_set_a_keys_priority_and_limits(
    app, service_env, monkeypatch, db_sessions, capsys
) -> None:
    from cli.main import main
    from shared.auth import lookup
    from shared.settings import get_settings

    for name, value in service_env.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    try:
        args = ["keys", "create", "--client", "ed", "--priority", "7", "--max-in-flight", "50"]
        assert main(args) == 0
        key = capsys.readouterr().out.splitlines()[0]
        with db_sessions() as session:
            principal = lookup(session, key)
        assert (principal.priority, principal.max_images_in_flight) == (7, 50)
        assert principal.max_submissions_per_minute is None  # the setting's
        prefix = key[:12]
        assert (
            main(["keys", "set", prefix, "--max-in-flight", "default", "--max-per-minute", "9"])
            == 0
        )
        assert main(["keys", "set", prefix, "--priority", "5000"]) == 2  # out of range: refused
    finally:
        get_settings.cache_clear()
    with db_sessions() as session:
        principal = lookup(session, key)
    assert (principal.priority, principal.max_images_in_flight) == (7, None)
    assert principal.max_submissions_per_minute == 9
    job = submit(with_key(app.test_client(), key), png_files(1))
    with db_sessions() as session:
        assert session.get(Job, job["id"]).priority == 7  # the key's priority, on its job
