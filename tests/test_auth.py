"""Per-client access and idempotent submission."""

from __future__ import annotations

import threading
import uuid

import pytest

from api import create_app
from shared.auth import revoke
from shared.db import database
from shared.models import ApiKey, Job
from shared.settings import load_settings
from tests.factories import bearer, make_key, png_files, post_files


def post(client, headers=None, n=1):
    return post_files(client, png_files(n), headers=headers)


def test_missing_and_bad_keys_get_401(app) -> None:
    client = app.test_client()
    for headers, code in [
        ({}, "missing_api_key"),
        ({"Authorization": "Basic abc"}, "invalid_api_key"),
        ({"Authorization": "Bearer"}, "invalid_api_key"),
        (bearer("cxr_not-a-real-key"), "invalid_api_key"),
        (bearer("x" * 10_000), "invalid_api_key"),
    ]:
        for resp in (
            post(client, headers),
            client.get(f"/v1/jobs/{uuid.uuid4()}", headers=headers),
            client.get(f"/v1/images/{uuid.uuid4()}", headers=headers),
        ):
            assert resp.status_code == 401
            assert resp.get_json()["error"]["code"] == code
            assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert client.get("/healthz").status_code == 200  # probes need no key


@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("/v1/jobs/{job}", "job_not_found"),
        ("/v1/jobs/{job}/results.csv", "job_not_found"),
        ("/v1/images/{image}", "image_not_found"),
    ],
)
def test_clients_only_see_their_own_jobs(app, db_sessions, path, code) -> None:
    client = app.test_client()
    alice, bob = make_key(db_sessions, "alice"), make_key(db_sessions, "bob")
    admin = make_key(db_sessions, "ops", is_admin=True)
    job = post(client, bearer(alice)).get_json()
    path = path.format(job=job["id"], image=job["images"][0]["id"])
    assert client.get(path, headers=bearer(alice)).status_code == 200
    other = client.get(path, headers=bearer(bob))
    assert other.status_code == 404  # not 403: no hint that it exists
    assert other.get_json()["error"]["code"] == code
    assert client.get(path, headers=bearer(admin)).status_code == 200


def test_revoked_key_is_refused(app, db_sessions) -> None:
    client = app.test_client()
    key = make_key(db_sessions, "alice")
    assert post(client, bearer(key)).status_code == 202
    with db_sessions.begin() as session:
        assert revoke(session, key[:12]) == 1
    resp = post(client, bearer(key))
    assert resp.status_code == 401
    assert resp.get_json()["error"]["code"] == "invalid_api_key"


def test_only_the_hash_is_stored(db_sessions) -> None:
    key = make_key(db_sessions, "alice")
    with db_sessions() as session:
        row = session.query(ApiKey).one()
    assert key not in (row.key_hash, row.prefix, row.id)
    assert len(row.key_hash) == 64


def test_auth_can_be_disabled_explicitly(service_env) -> None:
    settings = load_settings({**service_env, "CXR_AUTH_DISABLED": "true"})
    client = create_app(settings).test_client()
    job = post(client).get_json()
    assert client.get(f"/v1/jobs/{job['id']}").status_code == 200


def test_idempotency_key_returns_the_original_job(client, app, db_sessions) -> None:
    first = post(client, {"Idempotency-Key": "upload-42"}, n=2)
    assert first.status_code == 202
    again = post(client, {"Idempotency-Key": "upload-42"}, n=2)
    assert again.status_code == 200
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.get_json()["id"] == first.get_json()["id"]
    assert [i["id"] for i in again.get_json()["images"]] == [
        i["id"] for i in first.get_json()["images"]
    ]
    other = post(client, {"Idempotency-Key": "upload-43"})
    assert other.get_json()["id"] != first.get_json()["id"]
    # the same key from another client is another job
    bob = post(
        app.test_client(), {**bearer(make_key(db_sessions, "bob")), "Idempotency-Key": "upload-42"}
    )
    assert bob.status_code == 202
    assert bob.get_json()["id"] != first.get_json()["id"]
    with db_sessions() as session:
        assert session.query(Job).count() == 3


def test_concurrent_retries_with_one_key_make_one_job(app, api_key, db_sessions) -> None:
    results: list[int] = []

    def send() -> None:
        results.append(
            post(app.test_client(), {**bearer(api_key), "Idempotency-Key": "race"}).status_code
        )

    threads = [threading.Thread(target=send) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [200, 200, 200, 202]  # one creates the job, the rest replay it
    with db_sessions() as session:
        assert session.query(Job).filter(Job.idempotency_key == "race").count() == 1


def test_bad_idempotency_key(client) -> None:
    resp = post(client, {"Idempotency-Key": "k" * 201})
    assert resp.status_code == 400
    assert resp.get_json()["error"]["code"] == "invalid_parameter"


def test_keys_commands(tmp_path, monkeypatch, capsys) -> None:
    from cli.main import main
    from shared.auth import lookup
    from shared.migrate import upgrade
    from shared.settings import get_settings

    url = f"sqlite:///{tmp_path / 'keys.db'}"
    upgrade(url)
    monkeypatch.setenv("CXR_DATABASE_URL", url)
    get_settings.cache_clear()
    try:
        assert main(["keys", "create", "--client", "st-marys"]) == 0
        key = capsys.readouterr().out.splitlines()[0]
        assert key.startswith("cxr_")
        assert main(["keys", "create", "--client", "ops", "--admin"]) == 0
        capsys.readouterr()
        assert main(["keys", "list"]) == 0
        listing = capsys.readouterr().out
        assert key[:12] in listing
        assert key not in listing  # only prefixes are ever shown
        with database(url) as sessions:
            with sessions() as session:
                assert lookup(session, key).client == "st-marys"
            assert main(["keys", "revoke", key[:12]]) == 0
            with sessions() as session:
                assert lookup(session, key) is None
        assert main(["keys", "revoke", key[:12]]) == 1  # nothing left to revoke
    finally:
        get_settings.cache_clear()
