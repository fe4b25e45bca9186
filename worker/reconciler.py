"""The reconciler: makes the broker agree with the job store, which is the source of truth.

Every worker runs one (a thread in the worker's main process, at start and then every
`reconcile_seconds`). Each pass:
- requeues running jobs whose heartbeat is older than `stale_seconds` (their worker died:
  OOM-killed, machine lost) and re-sends them, or fails them once they used `max_attempts`;
  running follow-ups (verifications, publications) the same way (they beat too);
- re-sends queued jobs whose message the broker no longer holds (lost: Redis flushed or
  restarted without persistence) as soon as two passes in a row found it missing (one pass
  alone could catch a message between Redis's queue and its unacked set), and in any case
  once it went out more than `resend_seconds` ago unclaimed. On a broker that cannot be looked
  into (the embedded SQL one) a job waiting that long is re-sent anyway, at most once per
  `resend_seconds`. Queued follow-ups whose message is gone are re-sent the same way
  (Redis only).

Several reconcilers at once are safe: every change is a conditional UPDATE that one caller
wins, and a duplicate message is harmless because claiming a job is atomic.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Protocol

from app.db import utcnow
from app.settings import Settings
from app.store import Store

log = logging.getLogger("gptqd.reconciler")


@dataclass
class Pass:
    requeued: list[str] = field(default_factory=list)
    ended: list[str] = field(default_factory=list)
    resent: list[str] = field(default_factory=list)
    # queued jobs and follow-ups whose message the broker did not hold (Redis only)
    missing: set[str] = field(default_factory=set)


def job_leftovers(settings: Settings, job_id: str) -> list[Path]:
    """Everything a job's attempts may leave on disk besides its published checkpoint."""
    return [settings.work_dir / job_id, *settings.artifacts_dir.glob(f"{job_id}.*.partial")]


def remove_leftovers(settings: Settings, job_id: str) -> None:
    for path in job_leftovers(settings, job_id):
        shutil.rmtree(path, ignore_errors=True)


class Sender(Protocol):
    def declare(self) -> None: ...
    def send_job(self, job_id: str) -> bool: ...
    def send_follow_up(self, follow_up_id: str) -> bool: ...
    def pending_ids(self) -> set[str] | None: ...


def reconcile(store: Store, settings: Settings, sender: Sender,
              missing_before: set[str] | frozenset[str] = frozenset()) -> Pass:
    """One pass; `sender` is the Dispatcher (app/dispatch.py); `missing_before` is the last
    pass's `missing`."""
    sender.declare()
    send = sender.send_job
    now = utcnow()
    done = Pass()
    done.requeued, done.ended = store.requeue_stale(
        now - timedelta(seconds=settings.stale_seconds), settings.max_attempts
    )
    for job_id in done.ended:
        remove_leftovers(settings, job_id)
    for job_id in done.requeued:
        send(job_id)
    stale_follow_ups, failed_follow_ups = store.requeue_stale_follow_ups(
        now - timedelta(seconds=settings.stale_seconds), settings.max_attempts
    )
    for fid in stale_follow_ups:
        sender.send_follow_up(fid)
    done.requeued += stale_follow_ups
    done.ended += failed_follow_ups
    pending = sender.pending_ids()
    queued_follow_ups_at: dict[str, datetime] = {}
    if pending is not None:
        queued_follow_ups_at = store.queued_follow_ups()
        done.missing = ({*store.queued_job_ids(), *queued_follow_ups_at} - pending)
        lost = done.missing & set(missing_before)
        # the cutoff keeps a job that another reconciler re-sent during this pass from going
        # out twice
        done.resent = store.take_unclaimed(
            now - timedelta(seconds=settings.reconcile_seconds / 2), pending, only=lost)
    done.resent += store.take_unclaimed(now - timedelta(seconds=settings.resend_seconds),
                                        pending or frozenset())
    for job_id in done.resent:
        send(job_id)
    if pending is not None:  # follow-ups keep no "sent" mark: re-sent only when seen lost
        cutoff = now - timedelta(seconds=settings.resend_seconds)
        waited = {fid for fid, created in queued_follow_ups_at.items() if created < cutoff}
        seen_lost = done.missing & (waited | set(missing_before))
        for fid in sorted(seen_lost & queued_follow_ups_at.keys()):
            sender.send_follow_up(fid)
            done.resent.append(fid)
    if done.requeued or done.ended or done.resent:
        log.warning("reconciled: requeued %s, failed %s, re-sent %s",
                    done.requeued, done.ended, done.resent)
    return done


# Pool processes (each hands one task to its job process, worker/jobprocess.py) are forked
# from the worker's main process, where this thread may be inside SQLite (store, embedded
# broker) or a socket library at that moment: a child forked then inherits their locks held
# and hangs at its first query (seen once: a job left 'queued', its process blocked until the
# worker stopped). A fork waits for the pass to end instead.
_in_pass = threading.Lock()
_fork_guarded = False


def _guard_forks() -> None:
    global _fork_guarded
    if not _fork_guarded:
        os.register_at_fork(before=_in_pass.acquire, after_in_parent=_in_pass.release,
                            after_in_child=_in_pass.release)
        _fork_guarded = True


class Reconciler(threading.Thread):
    """Runs reconcile() now and then every `settings.reconcile_seconds` until stopped."""

    def __init__(self, store: Store, settings: Settings, sender: Sender) -> None:
        super().__init__(name="gptqd-reconciler", daemon=True)
        self.store, self.settings, self.sender = store, settings, sender
        self.stopping = threading.Event()
        _guard_forks()

    def run(self) -> None:
        missing: set[str] = set()
        while True:
            try:
                with _in_pass:
                    missing = reconcile(self.store, self.settings, self.sender, missing).missing
            except Exception:  # a store or broker outage: try again next time
                log.warning("reconcile pass failed", exc_info=True)
            if self.stopping.wait(self.settings.reconcile_seconds):
                return

    def stop(self) -> None:
        self.stopping.set()
