"""Celery tasks. A message carries only an id; everything else is read from the job store."""

from __future__ import annotations

from functools import cache

from app.settings import get_settings
from app.store import Store
from worker.celery_app import RUN_JOB, RUN_VERIFICATION, app


@cache
def _store() -> Store:
    store = Store(get_settings().store_url)
    store.create_all()
    return store


@app.task(name=RUN_JOB, acks_late=True, reject_on_worker_lost=True)
def run_job(job_id: str) -> str | None:
    from worker.jobrunner import run_job as run

    return run(job_id, _store(), get_settings())


@app.task(name=RUN_VERIFICATION, acks_late=True, reject_on_worker_lost=True)
def run_verification(verification_id: str) -> str | None:
    from worker.verifier import run_verification as run

    return run(verification_id, _store(), get_settings())
