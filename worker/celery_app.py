"""The Celery application: broker wiring and the worker settings for long GPU jobs.

The job store is the source of truth; a message only says "look at job X", so the tasks are
idempotent and results are not kept in Celery (no result backend). Start a worker with
`celery -A worker.celery_app worker` (or `gptqd worker`, which adds the per-GPU flags).
"""

from __future__ import annotations

from celery import Celery
from celery.signals import worker_init

from app.settings import Settings, get_settings

RUN_JOB = "gptqd.run_job"
RUN_VERIFICATION = "gptqd.run_verification"


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
        # a fresh process per job frees everything the job allocated (GPU memory included)
        worker_max_tasks_per_child=1,
        worker_concurrency=1,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    return celery


@worker_init.connect
def _preload_engine(**_: object) -> None:
    """Import torch, transformers and the engine once in the worker's main process, so each
    fresh per-job child (forked from it) starts in a fraction of a second. Importing does not
    initialise CUDA, so the fork stays safe on a GPU box."""
    import transformers  # noqa: F401

    import worker.gptq.api
    import worker.gptq.loader  # noqa: F401


app = make_celery(get_settings())
