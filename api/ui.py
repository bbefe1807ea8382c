"""The web UI for the people who read the results: sign-in, upload, jobs, one job, one image.

Invariant: pages are rendered on the server by Jinja with autoescaping, and the only scripts
and styles are the static files under ``api/static`` (no inline script or style), so every
answer of this blueprint can carry a strict Content-Security-Policy.  Pages read the database
through the API's own queries and ownership rules (another client's job or image is "not
found", as in the API); the browser's JavaScript calls the same ``/v1`` API with the session
cookie (api/ui_sessions.py) and the page's CSRF token.  An API key is only ever read from the
sign-in form's body: never from a URL, never written into a page, a cookie or a log.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import secrets

from flask import (
    Blueprint,
    Flask,
    Response,
    g,
    make_response,
    redirect,
    render_template,
    request,
    url_for,
)
from sqlalchemy import select

from api import ui_sessions
from api.auth import ANONYMOUS, caller_may_read, current_principal
from api.errors import RETRY_AFTER_SECONDS, APIError, ErrorCode
from api.extensions import service
from api.images import load_image
from api.jobs import load_job
from api.queries import image_dict, int_arg, job_summary
from shared.models import TERMINAL_IMAGE, TERMINAL_JOB, ImageStatus, Job
from shared.settings import Settings

log = logging.getLogger(__name__)

bp = Blueprint(
    "ui", __name__, static_folder="static", static_url_path="/static", template_folder="templates"
)

CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data: blob:",
        "frame-ancestors 'none'",
        "form-action 'self'",
        "base-uri 'none'",
    )
)
#: The sign-in form's CSRF token, before any session exists (double submit: cookie and form).
SIGNIN_COOKIE = "cxr_signin"
SIGNIN_FORM_SECONDS = 3600
JOBS_PER_PAGE = 25
#: Endpoints that need no sign-in.
PUBLIC = frozenset({"ui.signin", "ui.signin_post", "ui.signed_in", "ui.static"})
MODEL_WARNING = (
    "The model puts films in an order for a radiologist to read; it must not rule COVID-19 in "
    "or out. It flags most adult films without COVID-19 too, and every child's film: it is not "
    "fit to screen children (see the model card, MODEL_CARD.md)."
)
LABELS = {"covid": "Flagged: COVID-19 suspected", "non-covid": "Not flagged"}


def init_app(app: Flask, settings: Settings) -> None:
    ui_sessions.init_app(app, settings)
    app.register_blueprint(bp)


@bp.before_request
def _require_reader() -> Response | None:
    """Every page but sign-in needs a reader: signed in, or no keys at all (auth disabled)."""
    if request.endpoint in PUBLIC:
        return None
    if service.state.settings.auth_disabled:
        g.principal = ANONYMOUS
        return None
    session = ui_sessions.current()
    if session is None:
        return redirect(url_for("ui.signin", next=_here()), 303)
    g.principal = session.principal
    return None


@bp.after_request
def _security_headers(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["X-Frame-Options"] = "DENY"
    if response.mimetype == "text/html":  # pages hold a CSRF token and patients' filenames
        response.headers["Cache-Control"] = "no-store"
    return response


@bp.context_processor
def _page_context() -> dict[str, object]:
    session = None if service.state.settings.auth_disabled else ui_sessions.current()
    return {
        "csrf_token": session.csrf_token if session else "",
        "reader": session.principal if session else None,
        "auth_disabled": service.state.settings.auth_disabled,
        "model_warning": MODEL_WARNING,
    }


@bp.app_template_filter("when")
def _when(value: str | dt.datetime | None) -> str:
    if value is None:
        return "—"
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


@bp.errorhandler(APIError)
def _error_page(exc: APIError) -> tuple[str, int]:
    return render_template("error.html", code=exc.code.value, message=exc.message), exc.status


@bp.errorhandler(ui_sessions.SessionStoreUnavailableError)
def _store_down(_exc: Exception) -> tuple[str, int, dict[str, str]]:
    code = ErrorCode.SESSION_STORE_UNAVAILABLE
    page = render_template(
        "error.html", code=code.value, message="Sign-in is unavailable for a moment; retry shortly."
    )
    return page, code.status, {"Retry-After": str(RETRY_AFTER_SECONDS)}


# ---------------------------------------------------------------------------------- sign-in


def _here() -> str:
    return request.full_path.rstrip("?") if request.query_string else request.path


#: A path on this site: printable ASCII only (browsers drop tabs and newlines, so "/\t/host"
#: would be "//host"; CR or LF could not go in a header at all), never "//" or "/\\" (another
#: host).
_LOCAL_PATH = re.compile(r"/(?![/\\])[\x21-\x7e]{0,1999}")


def _next_page() -> str:
    """Where to go after signing in: a path on this site only (never another host)."""
    target = request.values.get("next", "")
    return target if _LOCAL_PATH.fullmatch(target) else url_for("ui.jobs")


def _signin_page(error: str | None = None, status: int = 200) -> Response:
    token = secrets.token_urlsafe(32)
    page = render_template("signin.html", signin_token=token, next=_next_page(), error=error)
    response = make_response(page, status)
    response.set_cookie(
        SIGNIN_COOKIE,
        token,
        max_age=SIGNIN_FORM_SECONDS,
        path=url_for("ui.signin"),
        secure=True,
        httponly=True,
        samesite="Strict",
    )
    return response


@bp.get("/signin")
def signin() -> Response:
    if service.state.settings.auth_disabled or ui_sessions.current() is not None:
        return redirect(_next_page(), 303)
    return _signin_page()


@bp.post("/signin")
def signin_post() -> Response:
    if not ui_sessions.tokens_match(
        request.cookies.get(SIGNIN_COOKIE, ""), request.form.get("csrf_token")
    ):
        return _signin_page("The sign-in form had expired. Please sign in again.", 403)
    key = request.form.get("api_key", "").strip()
    session = ui_sessions.open_session(key) if key else None
    if session is None:
        return _signin_page("That API key is unknown or has been revoked.", 401)
    log.info("web UI sign-in for client %s", session.principal.client)
    response = redirect(url_for("ui.signed_in", next=_next_page()), 303)
    ui_sessions.set_cookie(response, session)
    response.delete_cookie(SIGNIN_COOKIE, path=url_for("ui.signin"))
    return response


@bp.get("/signed-in")
def signed_in() -> Response:
    """The first page after signing in: tells the reader when the browser dropped the cookie
    (it is Secure: plain HTTP to anything but localhost cannot keep it)."""
    if service.state.settings.auth_disabled or ui_sessions.current() is not None:
        return redirect(_next_page(), 303)
    return _signin_page(
        "Your browser did not keep the sign-in cookie. The web UI needs HTTPS "
        "(or http://localhost), and cookies allowed for this site.",
        400,
    )


@bp.post("/signout")
def signout() -> Response:
    session = ui_sessions.current()
    if session is not None:
        if not ui_sessions.tokens_match(session.csrf_token, request.form.get("csrf_token")):
            raise APIError(ErrorCode.CSRF_FAILED, "the sign-out form is not this session's")
        ui_sessions.close(session.sid)
    response = redirect(url_for("ui.signin"), 303)
    ui_sessions.clear_cookie(response)
    return response


# ------------------------------------------------------------------------------------ pages


@bp.get("/")
def jobs() -> str:
    page = int_arg("page", 1, 1, 10**6)
    principal = current_principal()
    query = (
        select(Job)
        .where(caller_may_read(Job.client))
        .order_by(Job.created_at.desc(), Job.id.desc())
    )
    with service.state.sessions() as session:
        rows = session.scalars(query.offset((page - 1) * JOBS_PER_PAGE).limit(JOBS_PER_PAGE + 1))
        found = list(rows)
        summaries = [
            {**job_summary(session, job), "client": job.client} for job in found[:JOBS_PER_PAGE]
        ]
    return render_template(
        "jobs.html",
        jobs=summaries,
        page=page,
        has_more=len(found) > JOBS_PER_PAGE,
        terminal=[s.value for s in TERMINAL_JOB],
        show_client=principal.is_admin,
    )


@bp.get("/upload")
def upload() -> str:
    settings = service.state.settings
    return render_template(
        "upload.html",
        limits={
            "max_files": settings.max_files_per_job,
            "max_file_bytes": settings.max_file_bytes,
            "max_request_bytes": settings.max_request_bytes,
        },
        model_ready=service.state.model is not None,
    )


@bp.get("/jobs/<job_id>")
def job(job_id: str) -> str:
    with service.state.sessions() as session:
        summary = job_summary(session, load_job(session, job_id))
    return render_template(
        "job.html",
        job=summary,
        terminal=[s.value for s in TERMINAL_JOB],
        statuses=[s.value for s in ImageStatus],
        max_per_page=service.state.settings.max_per_page,
    )


@bp.get("/images/<image_id>")
def image(image_id: str) -> str:
    state = service.state
    with state.sessions() as session:
        row, result = load_image(session, image_id)
        details = image_dict(row, result, with_job=True)
    model = state.model
    # the threshold of the model that scored this film, when it is the one loaded now
    threshold = (
        model.threshold
        if model is not None and result is not None and result.model_version == model.version
        else None
    )
    return render_template(
        "image.html",
        image=details,
        label_text=LABELS.get(details["label"] or "", "No label"),
        threshold=threshold,
        scored=details["status"] == ImageStatus.COMPLETED,
        terminal=details["status"] in TERMINAL_IMAGE,
        terminal_statuses=sorted(s.value for s in TERMINAL_IMAGE),
    )
