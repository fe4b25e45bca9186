"""The Celery application: broker wiring and the worker settings for long GPU jobs.

The job store is the source of truth; a message only says "look at job X", so the tasks are
idempotent and results are not kept in Celery (no result backend). Start a worker with
`celery -A worker.celery_app worker` (or `gptqd worker`, which adds the per-GPU flags).
"""

from __future__ import annotations

import logging
import resource

from celery import Celery
from celery.signals import worker_init, worker_process_init, worker_ready, worker_shutdown

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


# what a job imports on first use (about 2 s per job otherwise); no computation runs here, so
# no thread pool exists yet when the job processes are forked
PRELOAD = (
    "transformers", "accelerate", "tokenizers", "safetensors.torch",
    "transformers.tokenization_utils_fast", "transformers.models.auto.tokenization_auto",
    "transformers.models.auto.modeling_auto", "transformers.models.llama.modeling_llama",
    "transformers.generation.utils", "huggingface_hub.serialization",
    "worker.gptq.api", "worker.gptq.loader", "worker.gptq.lazyload", "worker.gptq.export",
    "worker.gptq.calibration", "worker.gptq.pipeline", "worker.gptq.blockstore",
    "worker.gptq.evaluate",
)


@worker_init.connect
def _preload_engine(**_: object) -> None:
    """Import torch, transformers and the engine once in the worker's main process, so each
    fresh per-job child (forked from it) starts in a fraction of a second. Importing does not
    initialise CUDA, so the fork stays safe on a GPU box."""
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)


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
def _init_job_process(**_: object) -> None:
    """In each forked job process: drop the parent's database connections (never share a
    socket across a fork) and apply the job memory limit."""
    if _reconciler is not None:
        _reconciler.store.engine.dispose(close=False)
    limit = get_settings().job_memory_limit_mb
    if limit:
        size = limit * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (size, size))
        logging.getLogger("gptqd.worker").info("job memory limited to %d MiB", limit)


app = make_celery(get_settings())
