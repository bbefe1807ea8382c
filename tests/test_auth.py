"""Per-client access and idempotent submission."""

from __future__ import annotations

import io
import threading
import uuid

from api import create_app
from shared.auth import revoke
from shared.db import make_engine, make_session_factory
from shared.models import ApiKey, Job
from shared.settings import load_settings
from tests.conftest import make_key
from tests.factories import png_bytes


def post(client, headers=None, n=1, **extra):
    data = {"files": [(io.BytesIO(png_bytes(k)), f"{k}.png") for k in range(n)]}
    return client.post(
        "/v1/jobs", data=data, content_type="multipart/form-data", headers=headers or {}, **extra
    )


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


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


def test_clients_only_see_their_own_jobs(app, settings) -> None:
    client = app.test_client()
    alice, bob = make_key(settings, "alice"), make_key(settings, "bob")
    admin = make_key(settings, "ops", is_admin=True)
    job = post(client, bearer(alice)).get_json()
    image_id = job["images"][0]["id"]
    for path in (
        f"/v1/jobs/{job['id']}",
        f"/v1/jobs/{job['id']}/results.csv",
        f"/v1/images/{image_id}",
    ):
        assert client.get(path, headers=bearer(alice)).status_code == 200
        other = client.get(path, headers=bearer(bob))
        assert other.status_code == 404  # not 403: no hint that it exists
        assert other.get_json()["error"]["code"] in {"job_not_found", "image_not_found"}
        assert client.get(path, headers=bearer(admin)).status_code == 200


def test_revoked_key_is_refused(app, settings) -> None:
    client = app.test_client()
    key = make_key(settings, "alice")
    assert post(client, bearer(key)).status_code == 202
    engine = make_engine(settings.sqlalchemy_url)
    with make_session_factory(engine).begin() as session:
        assert revoke(session, key[:12]) == 1
    engine.dispose()
    assert post(client, bearer(key)).get_json()["error"]["code"] == "invalid_api_key"


def test_only_the_hash_is_stored(settings) -> None:
    key = make_key(settings, "alice")
    engine = make_engine(settings.sqlalchemy_url)
    with make_session_factory(engine)() as session:
        row = session.query(ApiKey).one()
        assert key not in (row.key_hash, row.prefix, row.id)
        assert len(row.key_hash) == 64
    engine.dispose()


def test_auth_can_be_disabled_explicitly(service_env) -> None:
    settings = load_settings({**service_env, "CXR_AUTH_DISABLED": "true"})
    client = create_app(settings).test_client()
    job = post(client).get_json()
    assert client.get(f"/v1/jobs/{job['id']}").status_code == 200


def test_idempotency_key_returns_the_original_job(client, app, settings) -> None:
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
        app.test_client(), {**bearer(make_key(settings, "bob")), "Idempotency-Key": "upload-42"}
    )
    assert bob.status_code == 202
    assert bob.get_json()["id"] != first.get_json()["id"]
    engine = make_engine(settings.sqlalchemy_url)
    with make_session_factory(engine)() as session:
        assert session.query(Job).count() == 3
    engine.dispose()


def test_concurrent_retries_with_one_key_make_one_job(app, api_key, settings) -> None:
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
    assert sorted(results).count(202) >= 1
    assert set(results) <= {200, 202}
    engine = make_engine(settings.sqlalchemy_url)
    with make_session_factory(engine)() as session:
        assert session.query(Job).filter(Job.idempotency_key == "race").count() == 1
    engine.dispose()


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
        engine = make_engine(url)
        sessions = make_session_factory(engine)
        with sessions() as session:
            assert lookup(session, key).client == "st-marys"
        assert main(["keys", "revoke", key[:12]]) == 0
        with sessions() as session:
            assert lookup(session, key) is None
        assert main(["keys", "revoke", key[:12]]) == 1  # nothing left to revoke
        engine.dispose()
    finally:
        get_settings.cache_clear()
