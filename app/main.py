"""The FastAPI application: `create_app()` wires settings, store, broker and routers.

Run with `gptqd serve` or `uvicorn app.main:create_app --factory`.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from app import accesslog
from app.bodylimit import BodyLimit, Limit, too_large
from app.dispatch import Dispatcher
from app.routes import (
    artifacts,
    dashboard,
    datasets,
    events,
    health,
    jobs,
    metrics,
    publications,
    verifications,
)
from app.settings import Settings, get_settings
from app.store import Store

JSON_BODY_LIMIT = 1024 * 1024  # job specs are small; a huge body is refused with 413
MULTIPART_OVERHEAD = 64 * 1024


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    settings.ensure_dirs()
    logging.basicConfig(level=logging.INFO)
    # the API docs' assets come from the package, not a CDN: a team box behind a firewall
    # shows /docs and /redoc too
    app = FastAPIOffline(
        title="gptqd",
        version="0.1.0",
        description="GPTQ quantization jobs: submit, watch, download, verify.",
    )
    store = Store(settings.store_url)
    store.create_all()
    from worker.celery_app import make_celery

    app.state.settings = settings
    app.state.store = store
    app.state.api_keys = settings.keys()  # parsed once: a malformed GPTQD_API_KEYS stops startup
    accesslog.install(key.secret for key in app.state.api_keys)
    app.state.dispatcher = Dispatcher(make_celery(settings), settings.queue)

    app.include_router(health.router)
    app.include_router(jobs.router)
    app.include_router(events.router)
    app.include_router(artifacts.router)
    app.include_router(verifications.router)
    app.include_router(publications.router)
    app.include_router(datasets.router)
    app.include_router(metrics.router)
    app.include_router(dashboard.router)
    upload = settings.max_upload_bytes
    app.add_middleware(
        BodyLimit,
        default=Limit(JSON_BODY_LIMIT, too_large("request body", JSON_BODY_LIMIT)),
        # the upload's own check (datasets.save_upload) names the file's limit exactly; this
        # one stops a body far past it without reading it
        routes={("POST", "/datasets"): Limit(upload + MULTIPART_OVERHEAD, too_large("file", upload))},
    )
    return app
