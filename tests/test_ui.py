"""The web UI through Flask's test client: security headers, the session cookie, CSRF, the key
kept out of every page and cookie, escaping, and the film PNG the image page shows."""

from __future__ import annotations

import re
import time
import uuid

import cv2
import numpy as np
import pytest
import redis as redis_lib
from sqlalchemy import select

from api import create_app
from api.openapi import UNDESCRIBED_BLUEPRINTS
from api.ui import CONTENT_SECURITY_POLICY
from shared.auth import revoke
from shared.models import TERMINAL_IMAGE, ApiKey, Image
from shared.redis_server import free_port
from shared.settings import load_settings
from shared.storage import LocalBlobStore
from tests.factories import bearer, make_key, png_bytes, post_files, submit, with_key

HOSTILE = "<script>alert(1)</script>.png"
EXPECTED_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
)


def form_token(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, "the page has no form token"
    return match.group(1)


def page_token(html: str) -> str:
    match = re.search(r'<meta name="csrf-token" content="([^"]*)">', html)
    assert match, "the page has no CSRF meta tag"
    return match.group(1)


def sign_in(client, key: str, next_page: str | None = None):
    token = form_token(client.get("/signin").get_data(as_text=True))
    data = {"csrf_token": token, "api_key": key}
    if next_page:
        data["next"] = next_page
    return client.post("/signin", data=data)


@pytest.fixture
def reader(app, api_key):
    """A test client signed in to the web UI with ``api_key`` (no Authorization header)."""
    client = app.test_client()
    assert sign_in(client, api_key).status_code == 303
    return client


@pytest.fixture
def job(app, api_key) -> dict:
    """A job of the test client with a hostile file name and reference (no worker: queued)."""
    api = with_key(app.test_client(), api_key)
    return submit(api, [(HOSTILE, png_bytes(1)), ("b.png", png_bytes(2))], client_ref=HOSTILE)


def session_cookie(client) -> str:
    cookie = client.get_cookie("cxr_session")
    assert cookie is not None, "no session cookie"
    return cookie.value


def test_pages_answer_with_the_strict_content_security_policy(reader, job) -> None:
    assert CONTENT_SECURITY_POLICY == EXPECTED_CSP
    image_id = job["images"][0]["id"]
    for path in ("/", "/upload", f"/jobs/{job['id']}", f"/images/{image_id}", "/static/ui.js"):
        resp = reader.get(path)
        assert resp.status_code == 200, path
        assert resp.headers["Content-Security-Policy"] == EXPECTED_CSP, path
        assert resp.headers["X-Content-Type-Options"] == "nosniff", path
        assert resp.headers["Referrer-Policy"] == "no-referrer", path
        if resp.mimetype == "text/html":
            html = resp.get_data(as_text=True)
            assert "<script>" not in html, path  # no inline script
            assert "style=" not in html, path  # no inline style


def test_signed_out_pages_send_the_reader_to_sign_in(app) -> None:
    resp = app.test_client().get("/upload")
    assert resp.status_code == 303
    assert resp.headers["Location"] == "/signin?next=/upload"


def test_sign_in_sets_a_strict_session_cookie_that_is_not_the_key(app, api_key) -> None:
    client = app.test_client()
    resp = sign_in(client, api_key, next_page="/upload")
    assert resp.status_code == 303
    header = next(h for h in resp.headers.getlist("Set-Cookie") if h.startswith("cxr_session="))
    flags = {part.strip().split("=")[0].lower() for part in header.split(";")[1:]}
    assert {"secure", "httponly", "path", "samesite", "max-age"} <= flags
    assert "SameSite=Strict" in header
    assert "Path=/" in header
    sid = session_cookie(client)
    assert len(sid) >= 43  # 256 random bits, base64url
    assert api_key not in sid
    assert client.get(resp.headers["Location"]).headers["Location"] == "/upload"


def test_the_key_never_reaches_a_page_a_cookie_a_url_or_redis(app, api_key, job, redis_url) -> None:
    client = app.test_client()
    resp = sign_in(client, api_key)
    seen = [str(resp.headers), resp.get_data(as_text=True)]
    image_id = job["images"][0]["id"]
    for path in ("/", "/upload", f"/jobs/{job['id']}", f"/images/{image_id}", "/signin"):
        page = client.get(path, follow_redirects=True)
        seen += [str(page.headers), page.get_data(as_text=True), page.request.url]
    seen += [str(client.get_cookie(name)) for name in ("cxr_session", "cxr_signin")]
    store = redis_lib.Redis.from_url(redis_url)
    seen += [repr(store.get(k)) + repr(k) for k in store.scan_iter() if store.type(k) == b"string"]
    assert not [s for s in seen if api_key in s]


def test_a_wrong_key_is_refused(app) -> None:
    client = app.test_client()
    resp = sign_in(client, "cxr_" + "x" * 43)
    assert resp.status_code == 401
    assert "unknown or has been revoked" in resp.get_data(as_text=True)
    assert client.get_cookie("cxr_session") is None
    assert client.get("/").status_code == 303


def test_sign_in_needs_the_form_token(app, api_key) -> None:
    client = app.test_client()
    client.get("/signin")
    resp = client.post("/signin", data={"csrf_token": "forged", "api_key": api_key})
    assert resp.status_code == 403
    assert client.get_cookie("cxr_session") is None


def test_sign_in_never_redirects_to_another_site(app, api_key) -> None:
    for target in ("https://evil.example/", "//evil.example/", "/\\evil.example"):
        client = app.test_client()
        resp = sign_in(client, api_key, next_page=target)
        assert client.get(resp.headers["Location"]).headers["Location"] == "/"


#: Pages on another site once a browser has dropped tabs and newlines or read "\\" as "/",
#: and values no header may carry (CR, LF): each goes to the jobs page, never answers 500.
HOSTILE_NEXT = (
    "/\t/evil.example",
    "/\r",
    "/\n/evil.example",
    "/\\evil.example",
    "//evil.example",
    "/\u00e9vil",
    "/\u2215evil.example",
    "/a b",
)


def test_sign_in_redirects_a_hostile_next_to_the_jobs_page(app, api_key, reader) -> None:
    for target in HOSTILE_NEXT:
        client = app.test_client()
        landing = client.get(sign_in(client, api_key, next_page=target).headers["Location"])
        assert (landing.status_code, landing.headers["Location"]) == (303, "/"), repr(target)
        again = reader.get("/signin", query_string={"next": target})  # signed in already
        assert (again.status_code, again.headers["Location"]) == (303, "/"), repr(target)
    assert reader.get("/signin?next=/jobs/x%3Fy").headers["Location"] == "/jobs/x?y"


def test_the_session_cookie_reads_the_api(reader, job) -> None:
    resp = reader.get(f"/v1/jobs/{job['id']}")
    assert resp.status_code == 200
    assert resp.get_json()["image_count"] == 2
    assert reader.get(f"/v1/jobs/{job['id']}/results.csv").status_code == 200


def test_a_post_with_the_session_cookie_needs_the_csrf_token(reader) -> None:
    token = page_token(reader.get("/upload").get_data(as_text=True))
    files = [("a.png", png_bytes(3))]
    for headers in ({}, {"X-CSRF-Token": "wrong"}, {"X-CSRF-Token": token + "x"}):
        resp = post_files(reader, files, headers=headers)
        assert resp.status_code == 403, headers
        assert resp.get_json()["error"]["code"] == "csrf_failed"
    resp = post_files(reader, files, headers={"X-CSRF-Token": token})
    assert resp.status_code == 202


def test_the_bearer_header_wins_over_the_cookie(app, db_sessions, reader, job) -> None:
    other = make_key(db_sessions, "other-hospital")
    resp = reader.get(f"/v1/jobs/{job['id']}", headers=bearer(other))
    assert resp.status_code == 404  # the header's client, not the cookie's
    resp = reader.get(f"/v1/jobs/{job['id']}", headers={"Authorization": "Bearer nonsense"})
    assert resp.get_json()["error"]["code"] == "invalid_api_key"


def test_another_clients_job_and_image_are_not_found(app, db_sessions, job) -> None:
    client = app.test_client()
    sign_in(client, make_key(db_sessions, "other-hospital"))
    for path in (f"/jobs/{job['id']}", f"/images/{job['images'][0]['id']}"):
        resp = client.get(path)
        assert resp.status_code == 404, path
        assert resp.mimetype == "text/html"
        assert "b.png" not in resp.get_data(as_text=True)
    assert client.get(f"/v1/images/{job['images'][0]['id']}/film.png").status_code == 404


def test_a_revoked_key_ends_its_sessions(app, db_sessions, reader, job) -> None:
    with db_sessions.begin() as session:
        key_id = session.scalar(select(ApiKey.id).where(ApiKey.client == "test-hospital"))
        assert revoke(session, key_id) == 1
    assert reader.get("/").status_code == 303
    resp = reader.get(f"/v1/jobs/{job['id']}")
    assert resp.status_code == 401
    assert resp.get_json()["error"]["code"] == "session_expired"


def test_sign_out_deletes_the_session(app, reader, job) -> None:
    sid = session_cookie(reader)
    token = page_token(reader.get("/").get_data(as_text=True))
    assert reader.post("/signout", data={"csrf_token": "wrong"}).status_code == 403
    resp = reader.post("/signout", data={"csrf_token": token})
    assert resp.status_code == 303
    assert reader.get_cookie("cxr_session") is None
    replay = app.test_client()
    replay.set_cookie("cxr_session", sid)  # the old cookie, kept by an attacker
    resp = replay.get(f"/v1/jobs/{job['id']}")
    assert resp.get_json()["error"]["code"] == "session_expired"


def test_a_session_lives_in_redis_for_the_configured_time(service_env, api_key, redis_url):
    app = create_app(load_settings({**service_env, "CXR_UI_SESSION_SECONDS": "2"}))
    client = app.test_client()
    sign_in(client, api_key)
    assert client.get("/").status_code == 200
    store = redis_lib.Redis.from_url(redis_url)
    (key,) = store.keys("cxr:ui:session:*")
    assert 0 < store.ttl(key) <= 2
    time.sleep(2.2)
    assert client.get("/").status_code == 303


def test_hostile_file_names_and_references_are_escaped(reader, job) -> None:
    pages = [reader.get("/"), reader.get(f"/jobs/{job['id']}")]
    pages.append(reader.get(f"/images/{job['images'][0]['id']}"))
    for resp in pages:
        html = resp.get_data(as_text=True)
        assert "<script>alert(1)" not in html, resp.request.path
    assert "&lt;script&gt;alert(1)&lt;/script&gt;.png" in pages[2].get_data(as_text=True)
    assert "&lt;script&gt;" in pages[0].get_data(as_text=True)  # the reference


def test_without_authentication_the_ui_needs_no_sign_in(service_env) -> None:
    app = create_app(load_settings({**service_env, "CXR_AUTH_DISABLED": "true"}))
    client = app.test_client()
    assert client.get("/").status_code == 200
    assert client.get("/signin").status_code == 303
    job = submit(client, [("a.png", png_bytes(4))])
    assert client.get(f"/jobs/{job['id']}").status_code == 200


def test_the_film_is_a_downscaled_png(client) -> None:
    job = submit(client, [("big.png", png_bytes(5, height=1500, width=1200))])
    resp = client.get(f"/v1/images/{job['images'][0]['id']}/film.png")
    assert resp.status_code == 200
    assert resp.mimetype == "image/png"
    film = cv2.imdecode(np.frombuffer(resp.data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert film.shape == (1024, 819)  # grayscale, long side 1024, aspect kept


def test_an_unreadable_film_answers_409(client) -> None:
    job = submit(client, [("text.png", b"hello, not an image")])
    resp = client.get(f"/v1/images/{job['images'][0]['id']}/film.png")
    assert resp.status_code == 409
    assert resp.get_json()["error"]["code"] == "image_unreadable"
    assert client.get(f"/v1/images/{uuid.uuid4()}/film.png").status_code == 404


def test_the_film_is_described_in_openapi(client) -> None:
    spec = client.get("/openapi.json").get_json()
    film = spec["paths"]["/v1/images/{image_id}/film.png"]["get"]
    assert "image/png" in film["responses"]["200"]["content"]
    assert "image_unreadable" in film["responses"]["409"]["description"]


def test_openapi_leaves_out_the_ui_pages_and_only_them(app, client) -> None:
    spec = client.get("/openapi.json").get_json()
    for rule in app.url_map.iter_rules():
        path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
        if rule.endpoint.split(".")[0] in UNDESCRIBED_BLUEPRINTS:
            assert path not in spec["paths"], path
        elif path.startswith("/v1/"):
            assert path in spec["paths"], path


def test_sessions_unavailable_answer_503(service_env, api_key) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    app = create_app(load_settings({**service_env, "CXR_REDIS_URL": dead}))
    client = app.test_client()
    resp = sign_in(client, api_key)
    assert resp.status_code == 503
    assert resp.headers["Retry-After"]
    client.set_cookie("cxr_session", "x" * 43)
    resp = client.get(f"/v1/jobs/{uuid.uuid4()}")
    assert resp.status_code == 503
    assert resp.get_json()["error"]["code"] == "session_store_unavailable"


def test_the_film_is_never_cached_by_the_browser(client) -> None:
    job = submit(client, [("a.png", png_bytes(6))])
    resp = client.get(f"/v1/images/{job['images'][0]['id']}/film.png")
    assert resp.status_code == 200
    assert resp.headers["Cache-Control"] == "no-store"
    assert "ETag" not in resp.headers
    assert "Last-Modified" not in resp.headers


def test_a_film_missing_or_damaged_in_the_store_answers_409(client, db_sessions, settings) -> None:
    job = submit(client, [("gone.png", png_bytes(7)), ("damaged.png", png_bytes(8))])
    store = LocalBlobStore(settings.blob_path)
    with db_sessions() as session:
        keys = [session.get(Image, image["id"]).blob_key for image in job["images"]]
    store._path(keys[0]).unlink()
    store._path(keys[1]).write_bytes(b"not what was stored")
    for image in job["images"]:
        resp = client.get(f"/v1/images/{image['id']}/film.png")
        assert resp.status_code == 409, image["filename"]
        assert resp.get_json()["error"]["code"] == "image_unreadable"


def cross_site_post(test_client, origin: str | None, **headers: str):
    files = [("a.png", png_bytes(9))]
    if origin is not None:
        headers["Origin"] = origin
    return post_files(test_client, files, headers=headers)


def test_a_post_from_another_site_is_refused_without_authentication(service_env) -> None:
    """With no keys a browser on any site could otherwise submit through a form."""
    app = create_app(load_settings({**service_env, "CXR_AUTH_DISABLED": "true"}))
    client = app.test_client()
    for origin in ("https://evil.example", "null", "http://localhost.evil.example"):
        resp = cross_site_post(client, origin)
        assert resp.status_code == 403, origin
        assert resp.get_json()["error"]["code"] == "csrf_failed"
    assert cross_site_post(client, None).status_code == 202  # curl, a server
    assert cross_site_post(client, "http://localhost").status_code == 202  # this site's page
    read = client.get(f"/v1/jobs/{uuid.uuid4()}", headers={"Origin": "https://evil.example"})
    assert read.status_code == 404  # reads are not refused: only writes change anything
    behind_tls = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "cxr.ward.example"}
    assert cross_site_post(client, "https://cxr.ward.example", **behind_tls).status_code == 202


def test_a_post_from_another_site_is_refused_whatever_its_credentials(reader, api_key) -> None:
    token = page_token(reader.get("/upload").get_data(as_text=True))
    for headers in ({"X-CSRF-Token": token}, bearer(api_key)):
        resp = cross_site_post(reader, "https://evil.example", **headers)
        assert resp.status_code == 403, headers
        assert resp.get_json()["error"]["code"] == "csrf_failed"
        assert cross_site_post(reader, "http://localhost", **headers).status_code == 202


def test_the_job_page_polls_the_summary_alone(reader, job) -> None:
    script = reader.get("/static/job.js").get_data(as_text=True)
    polls = re.findall(r"jobUrl \+ \"\?per_page=(\d+)\"", script)
    assert polls == ["0"]
    resp = reader.get(f"/v1/jobs/{job['id']}?per_page=0")
    assert resp.get_json()["images"] == []


def test_the_image_page_reads_the_terminal_statuses_from_the_page(reader, job) -> None:
    html = reader.get(f"/images/{job['images'][0]['id']}").get_data(as_text=True)
    match = re.search(r'data-terminal-statuses="([^"]*)"', html)
    assert match, "the page does not carry the terminal statuses"
    assert set(match.group(1).split()) == {s.value for s in TERMINAL_IMAGE}
    script = reader.get("/static/image.js").get_data(as_text=True)
    assert "terminalStatuses" in script
    assert not re.search(r'"(completed|failed|skipped)"', script)  # none typed in the script


def test_an_admin_sees_every_clients_job_and_image(app, db_sessions, job) -> None:
    admin = app.test_client()
    sign_in(admin, make_key(db_sessions, "ops", is_admin=True))
    image_id = job["images"][1]["id"]
    assert job["id"] in admin.get("/").get_data(as_text=True)
    for path in (f"/jobs/{job['id']}", f"/images/{image_id}", f"/v1/jobs/{job['id']}"):
        assert admin.get(path).status_code == 200, path
    for path in (f"/v1/images/{image_id}", f"/v1/images/{image_id}/film.png"):
        assert admin.get(path).status_code == 200, path
    other = app.test_client()
    sign_in(other, make_key(db_sessions, "other-hospital"))
    assert job["id"] not in other.get("/").get_data(as_text=True)
    assert other.get(f"/v1/jobs/{job['id']}").status_code == 404
    assert other.get(f"/v1/images/{image_id}").status_code == 404
