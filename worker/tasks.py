"""Celery tasks. A message carries only an id; everything else is read from the job store.

A task hands its item to a clean job process (worker/jobprocess.py) and waits for it. If that
process dies (the kernel's OOM killer picks the biggest process: the job's), the attempt is
requeued at once, or failed once it used its attempts, instead of waiting for its heartbeat to
go stale.
"""

from __future__ import annotations

import logging
import signal
from functools import cache

from app.settings import get_settings
from app.store import Store
from app.tasknames import RUN_JOB, RUN_VERIFICATION
from worker.celery_app import app
from worker.jobprocess import Kind, Launcher

log = logging.getLogger("gptqd.worker")
launcher = Launcher()


@cache
def _store() -> Store:
    store = Store(get_settings().store_url)
    store.create_all()
    return store


def _is_queued(kind: Kind, item_id: str) -> bool:
    store = _store()
    item = store.get_job(item_id) if kind == "job" else store.get_verification(item_id)
    return item is not None and item.status == "queued"


def _run(kind: Kind, item_id: str) -> None:
    # A duplicate message (re-sent after a lost one, redelivered) or one for a cancelled job
    # would spend the waiting job process, and the next item would wait seconds for a new one
    # to import the engine. Claiming stays the job process's atomic step: this read only
    # spares the process when the answer is already known.
    if not _is_queued(kind, item_id):
        log.info("%s %s is not queued; skipping", kind, item_id)
        return
    pid, code = launcher.run(kind, item_id)
    if code != 0:
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        log.warning("the process running %s %s died (%s)", kind, item_id, how)
        _requeue_dead(kind, item_id, pid)


def _requeue_dead(kind: Kind, item_id: str, pid: int) -> None:
    """The attempt of a job process that died is requeued (and re-sent) now, or ended once it
    used max_attempts; an attempt that recorded its end, or that another worker holds, is left
    alone."""
    from app.dispatch import Dispatcher
    from worker.jobrunner import worker_name

    settings, store = get_settings(), _store()
    dispatcher = Dispatcher(app, settings.queue)
    if kind == "job":
        item, requeue, send = store.get_job(item_id), store.requeue_stale, dispatcher.send_job
        # a job records the worker that runs it: another worker may hold it by now
        mine = item is not None and item.worker == worker_name(pid)
    else:
        item, requeue, send = (store.get_verification(item_id), store.requeue_stale_verifications,
                               dispatcher.send_verification)
        mine = True
    if item is None or item.status != "running" or not mine:
        return
    requeued, _ = requeue(None, settings.max_attempts, only=(item_id, item.attempts))
    for requeued_id in requeued:
        send(requeued_id)


@app.task(name=RUN_JOB, acks_late=True, reject_on_worker_lost=True)
def run_job(job_id: str) -> None:
    _run("job", job_id)


@app.task(name=RUN_VERIFICATION, acks_late=True, reject_on_worker_lost=True)
def run_verification(verification_id: str) -> None:
    _run("verification", verification_id)
