"""Sending work to the workers. A message names only the job (or follow-up) id."""

from __future__ import annotations

import logging
import re

from celery import Celery

from app.tasknames import RUN_FOLLOW_UP, RUN_JOB

log = logging.getLogger("gptqd.api")
ITEM_ID = re.compile(rb"(?:job|ver|pub)_[0-9a-f]{32}")


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

    def send_follow_up(self, follow_up_id: str) -> bool:
        """A verification or a publication."""
        return self._send(RUN_FOLLOW_UP, follow_up_id)

    def declare(self) -> None:
        """Declares the queue and its binding afresh. Publishers remember what they declared,
        so after Redis lost its keys (flushed, restarted without persistence) every message
        would go to the undeliverable queue until someone declares the binding again."""
        with self.celery.connection_for_write() as conn:
            self.celery.amqp.queues[self.queue].bind(conn.default_channel).declare()

    def pending_ids(self) -> set[str] | None:
        """Ids named by the messages the broker holds for our queue, waiting or delivered and
        not yet acked; None when the broker cannot be looked into (only Redis can)."""
        with self.celery.connection_for_read() as conn:
            if conn.transport.driver_type != "redis":
                return None
            channel = conn.default_channel
            client = channel.client
            keys = [self.queue, *client.scan_iter(match=f"{self.queue}{channel.sep}*")]
            raw = [m for key in keys for m in client.lrange(key, 0, -1)]
            raw += client.hvals(channel.unacked_key)
        # the message headers carry the task's argsrepr in clear
        return {m.decode() for blob in raw for m in ITEM_ID.findall(blob)}

    def ping(self) -> None:
        """Raises when the broker does not answer."""
        with self.celery.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=3)
