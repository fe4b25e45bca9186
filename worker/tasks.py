"""Celery tasks. A message carries only an id; everything else is read from the job store.

A task hands its item to a clean job process (worker/jobprocess.py) and waits for it. If that
process dies (the kernel's OOM killer picks the biggest process: the job's), the attempt is
requeued at once, or failed once it used its attempts, instead of waiting for its heartbeat to
go stale. One that aborted under the job memory limit fails at once as out_of_memory: native
code (the tokenizers library) aborts the process when an allocation fails, and would again.
"""

from __future__ import annotations

import logging
import signal
from functools import cache

from app.settings import get_settings
from app.store import Store
from app.tasknames import RUN_FOLLOW_UP, RUN_JOB
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
    item = store.get_job(item_id) if kind == "job" else store.get_follow_up(item_id)
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
        _requeue_dead(kind, item_id, pid, code)


def memory_limit_abort(code: int, limit_mb: int) -> str | None:
    """The out_of_memory message for a job process that ended with `code` under a memory limit
    of limit_mb (0: none), if the limit explains it: an abort (SIGABRT) is how native
    libraries end on a failed allocation (torch raises MemoryError instead)."""
    if not limit_mb or code != -signal.SIGABRT:
        return None
    return (f"the job process aborted while its memory was limited to {limit_mb} MiB "
            "(GPTQD_JOB_MEMORY_LIMIT_MB): native code (a tokenizer, a math library) could not "
            "allocate; lower calibration.num_samples or seq_length, use a smaller calibration "
            "dataset, or raise the limit")


def _requeue_dead(kind: Kind, item_id: str, pid: int, code: int) -> None:
    """The attempt of a job process that died is requeued (and re-sent) now, or ended once it
    used max_attempts, or at once as out_of_memory when the memory limit explains the death;
    an attempt that recorded its end, or that another worker holds, is left alone."""
    from app.dispatch import Dispatcher
    from worker.jobrunner import worker_name
    from worker.reconciler import remove_leftovers

    settings, store = get_settings(), _store()
    dispatcher = Dispatcher(app, settings.queue)
    if kind == "job":
        item, requeue, send = store.get_job(item_id), store.requeue_stale, dispatcher.send_job
        # a job records the worker that runs it: another worker may hold it by now
        mine = item is not None and item.worker == worker_name(pid)
    else:
        item, requeue, send = (store.get_follow_up(item_id), store.requeue_stale_follow_ups,
                               dispatcher.send_follow_up)
        mine = True
    if item is None or item.status != "running" or not mine:
        return
    if (message := memory_limit_abort(code, settings.job_memory_limit_mb)) is not None:
        log.warning("%s %s ran out of memory: %s", kind, item_id, message)
        error = ("out_of_memory", message)
        if kind == "follow-up":
            store.finish_follow_up(item_id, "failed", error=error, attempt=item.attempts)
        elif store.finish_job(item_id, item.attempts, "failed", error=error):
            remove_leftovers(settings, item_id)
        return
    requeued, ended = requeue(None, settings.max_attempts, only=(item_id, item.attempts))
    for requeued_id in requeued:
        send(requeued_id)
    if kind == "job":
        for ended_id in ended:  # no attempt will resume from its finished blocks
            remove_leftovers(settings, ended_id)


@app.task(name=RUN_JOB, acks_late=True, reject_on_worker_lost=True)
def run_job(job_id: str) -> None:
    _run("job", job_id)


@app.task(name=RUN_FOLLOW_UP, acks_late=True, reject_on_worker_lost=True)
def run_follow_up(follow_up_id: str) -> None:
    """A verification or a publication of a succeeded job's checkpoint."""
    _run("follow-up", follow_up_id)
