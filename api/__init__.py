"""The Flask API: validation, durable storage, enqueueing and reads. Nothing heavy runs here."""

from __future__ import annotations

from flask import Flask

from api import metrics, request_id
from api.errors import register_error_handlers
from api.extensions import service
from shared.settings import Settings, get_settings


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or get_settings()
    app = Flask(__name__, static_folder=None)  # api/static is the web UI's (api/ui.py)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    app.config["MAX_FORM_MEMORY_SIZE"] = 1024 * 1024  # text fields; files spool to disk
    app.config["MAX_FORM_PARTS"] = settings.max_files_per_job + 16  # one part per file
    app.json.sort_keys = False
    service.init_app(app, settings)
    register_error_handlers(app)
    request_id.init_app(app)
    metrics.init_app(app)

    from api.callbacks import bp as callbacks_bp
    from api.dicomweb import bp as dicomweb_bp
    from api.health import bp as health_bp
    from api.images import bp as images_bp
    from api.jobs import bp as jobs_bp
    from api.openapi import bp as openapi_bp
    from api.ui import init_app as init_ui

    app.register_blueprint(health_bp)
    app.register_blueprint(openapi_bp)
    app.register_blueprint(jobs_bp, url_prefix="/v1/jobs")
    app.register_blueprint(images_bp, url_prefix="/v1/images")
    app.register_blueprint(dicomweb_bp, url_prefix="/dicomweb")
    app.register_blueprint(callbacks_bp, url_prefix="/v1/callback-secret")
    init_ui(app, settings)  # the web UI: /, /signin, /upload, /jobs/..., /images/..., /static
    return app
