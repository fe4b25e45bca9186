"""Runs one follow-up of a succeeded job: a verification (worker/verifier.py) or a publication
(worker/publisher.py). Both are claimed, beat and finished alike; only the work differs."""

from __future__ import annotations

import logging

from app.settings import Settings
from app.store import Store
from worker.jobrunner import error_of, heartbeat, scratch_dir
from worker.progress_writer import follow_up_writer

log = logging.getLogger("gptqd.worker")
DONE_MESSAGE = {"verification": "verified", "publication": "published"}


def run_follow_up(follow_up_id: str, store: Store, settings: Settings) -> str | None:
    """Its final status; None when it was not queued (claimed elsewhere, or ended)."""
    item = store.claim_follow_up(follow_up_id)
    if item is None:
        return None
    kind = item.kind or "verification"
    job = store.get_job(item.job_id)
    if job is None or job.status != "succeeded":
        store.finish_follow_up(
            follow_up_id, "failed",
            error=("job_not_succeeded", "the job has no checkpoint (not succeeded or deleted)"),
        )
        return "failed"
    attempt = item.attempts
    beat = heartbeat(lambda: store.heartbeat_follow_up(follow_up_id, attempt),
                     follow_up_id, settings.heartbeat_seconds)
    writer = follow_up_writer(store, follow_up_id, attempt, settings.progress_interval)
    try:
        with beat, scratch_dir(settings, f"{follow_up_id}.{attempt}"):
            if kind == "publication":
                from worker.publisher import publish

                result = publish(job, item.spec, settings, writer)
            else:
                from worker.verifier import measure

                result = measure(job.spec, {**item.spec, "job_id": job.id}, store, settings,
                                 writer)
    except Exception as exc:
        log.exception("%s %s failed", kind, follow_up_id)
        store.finish_follow_up(follow_up_id, "failed", error=error_of(exc), attempt=attempt,
                               progress=writer.final("failed", ""))
        return "failed"
    store.finish_follow_up(follow_up_id, "succeeded", result=result, attempt=attempt,
                           progress=writer.final("done", DONE_MESSAGE[kind], 1.0))
    return "succeeded"
