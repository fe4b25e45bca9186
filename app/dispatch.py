"""Sending work to the workers. A message names only the job (or verification) id."""

from __future__ import annotations

import logging

from celery import Celery

from worker.celery_app import RUN_JOB, RUN_VERIFICATION

log = logging.getLogger("gptqd.api")


class Dispatcher:
    def __init__(self, celery: Celery, queue: str) -> None:
        self.celery, self.queue = celery, queue

    def _send(self, task: str, item_id: str) -> bool:
        # the store already holds the work; a failed send is logged and re-sent from the store
        # (see the reconciler), never turned into a failed request
        try:
            self.celery.send_task(task, args=[item_id], queue=self.queue,
                                  retry=True, retry_policy={"max_retries": 2})
            return True
        except Exception:
            log.warning("could not send %s(%s) to the broker", task, item_id, exc_info=True)
            return False

    def send_job(self, job_id: str) -> bool:
        return self._send(RUN_JOB, job_id)

    def send_verification(self, verification_id: str) -> bool:
        return self._send(RUN_VERIFICATION, verification_id)

    def ping(self) -> None:
        """Raises when the broker does not answer."""
        with self.celery.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=3)
