"""The Celery application: broker wiring and the worker settings for long GPU jobs.

The job store is the source of truth; a message only says "look at job X", so the tasks are
idempotent and results are not kept in Celery (no result backend). Start a worker with
`celery -A worker.celery_app worker` (or `gptqd worker`, which adds the per-GPU flags).

The worker's own processes never run engine code and never import torch: each job runs in a
clean process of its own (worker/jobprocess.py), so nothing imported here, by us or by a
library a team installs, can break it.
"""

from __future__ import annotations

import logging
import os
import sys

from celery import Celery
from celery.signals import worker_init, worker_process_init, worker_ready, worker_shutdown

from app.settings import Settings, get_settings


def make_celery(settings: Settings) -> Celery:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    celery = Celery("gptqd", broker=settings.broker, include=["worker.tasks"])
    if settings.broker.startswith(("sqla+", "sqlalchemy+")):
        # kombu's SQL transport hands these to create_engine; its messages are never
        # redelivered, the store's reconciler re-sends lost ones instead
        transport_options: dict = {"connect_args": {"timeout": 60}}
    else:
        transport_options = {"visibility_timeout": settings.visibility_timeout}
    celery.conf.update(
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        task_default_queue=settings.queue,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        # a long job is acked only when it is done, and a worker reserves one job at a time
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        # a worker killed mid-job (OOM) puts the message back; the store's attempt counter
        # stops a job that keeps killing workers from looping forever
        task_reject_on_worker_lost=True,
        # late-acked jobs are redelivered on a broker connection loss: stop ours rather than
        # letting two workers run the same job (the store's claim also refuses the second)
        worker_cancel_long_running_tasks_on_connection_loss=True,
        task_track_started=True,
        # no fresh pool process per job: the job itself runs in a clean exec'd process
        # (worker/jobprocess.py), which frees everything it allocated (GPU memory included),
        # and the pool process that lives on starts the next one while a job runs
        worker_concurrency=1,
        worker_hijack_root_logger=False,
        # a pool process reports for duty once its first job process has imported the engine
        worker_proc_alive_timeout=JOB_PROCESS_READY_SECONDS + 30,
        worker_send_task_events=False,
    )
    return celery


_solo = False  # tasks run in the worker's main process (--pool=solo)
# how long a pool process (or a solo worker) waits, at start, for its first job process to
# import the engine: it takes no job before, so its first job starts at once
JOB_PROCESS_READY_SECONDS = 300.0


def _first_job_process() -> None:
    from worker.tasks import launcher

    launcher.prepare()
    if not launcher.wait_ready(JOB_PROCESS_READY_SECONDS):
        logging.getLogger("gptqd.worker").warning(
            "the first job process did not report ready in %.0f s (it died, or its imports are "
            "slow): the first job may start late", JOB_PROCESS_READY_SECONDS)


@worker_init.connect
def _check_worker(sender: object = None, **_: object) -> None:
    """Refuse to start a worker whose jobs could only fail: GPTQD_DEVICE asks for a device
    that does not work here. One clear message instead of a failed job after job."""
    global _solo
    pool = getattr(sender, "pool_cls", "")
    _solo = "solo" in str(getattr(pool, "__name__", pool)).lower()
    from worker.devicecheck import device_problem

    problem = device_problem(get_settings().device)
    if problem:
        logging.getLogger("gptqd.worker").critical("%s", problem)
        print(f"gptqd worker: {problem}", file=sys.stderr, flush=True)
        os._exit(78)  # EX_CONFIG: a restart policy should not retry a broken configuration
    if _solo:  # jobs are handed out from this very process
        _first_job_process()


_reconciler = None  # the worker main process's reconciler thread (see worker/reconciler.py)


@worker_ready.connect
def _start_reconciler(**_: object) -> None:
    """At worker start and then periodically, the store and the broker are made to agree."""
    global _reconciler
    from app.dispatch import Dispatcher
    from app.store import Store
    from worker.reconciler import Reconciler

    settings = get_settings()
    store = Store(settings.store_url)
    store.create_all()
    dispatcher = Dispatcher(app, settings.queue)
    _reconciler = Reconciler(store, settings, dispatcher)
    _reconciler.start()


@worker_shutdown.connect
def _stop_reconciler(**_: object) -> None:
    if _reconciler is not None:
        _reconciler.stop()


@worker_process_init.connect
def _init_pool_process(**_: object) -> None:
    """In each pool process (forked from this one, one task at a time): drop the parent's
    database connections (never share a socket across a fork) and start the clean process its
    job will run in (worker/jobprocess.py), so it has imported the engine by the time the job
    arrives."""
    if _reconciler is not None:
        _reconciler.store.engine.dispose(close=False)
    _first_job_process()


app = make_celery(get_settings())
