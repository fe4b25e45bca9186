"""The engine's progress callback, writing to the job store (a job's, or a verification's).

Every change of stage, block or module becomes an event (so the log passes through every
block and module); repeats within a stage/module are throttled to one per `interval` seconds.
The job row's progress is updated in the same transaction as each event, and its fraction
never goes backwards.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from app.store import Store
from worker.gptq.progress import ProgressEvent


def progress_view(ev: ProgressEvent, fraction: float) -> dict[str, Any]:
    """The job's `progress` as the API shows it."""
    return {
        "stage": ev.stage,
        "block": ev.block,
        "num_blocks": ev.num_blocks,
        "module": ev.module,
        "fraction": round(min(max(fraction, 0.0), 1.0), 6),
        "eta_seconds": None if ev.eta_seconds is None else round(ev.eta_seconds, 3),
        "message": ev.message,
    }


Record = Callable[[dict[str, Any], dict[str, Any]], bool]  # (progress, event) -> still ours


class ProgressWriter:
    def __init__(
        self,
        record: Record,
        interval: float,
        clock: Callable[[], float] = time.monotonic,
        floor: float = 0.0,
    ) -> None:
        """record: stores the progress and its event (job_writer, follow_up_writer); floor:
        the fraction earlier attempts reached; a resumed attempt never shows less."""
        self.record, self.interval, self.clock = record, interval, clock
        self.fraction = floor
        self.last: dict[str, Any] = {"stage": "starting", "fraction": floor, "message": ""}
        self.lost = False  # the item is no longer this attempt's (requeued or finished elsewhere)
        self._key: tuple | None = None
        self._written_at = float("-inf")

    def __call__(self, ev: ProgressEvent) -> None:
        self.fraction = max(self.fraction, ev.fraction)
        key = (ev.stage, ev.block, ev.module)
        now = self.clock()
        if key == self._key and now - self._written_at < self.interval:
            return
        self._key, self._written_at = key, now
        progress = progress_view(ev, self.fraction)
        event = {
            **progress,
            "loss": ev.loss,
            "damp": ev.damp,
            "seconds": round(ev.seconds, 3),
            "stage_seconds": {k: round(v, 3) for k, v in ev.stage_seconds.items()},
        }
        self.last = progress
        if not self.record(progress, event):
            self.lost = True

    def final(self, stage: str, message: str, fraction: float | None = None) -> dict[str, Any]:
        """The progress a finished job keeps: the last one seen, with its end stage."""
        return {**self.last, "stage": stage, "message": message, "eta_seconds": 0.0,
                "fraction": self.fraction if fraction is None else fraction}


def job_writer(store: Store, job_id: str, attempt: int, interval: float,
               floor: float = 0.0) -> ProgressWriter:
    """A job attempt's progress: the job row's and one event each in its log."""
    return ProgressWriter(
        lambda progress, event: store.record_progress(job_id, attempt, progress, event),
        interval, floor=floor)


def follow_up_writer(store: Store, follow_up_id: str, attempt: int,
                     interval: float) -> ProgressWriter:
    """A follow-up attempt's progress: its row's (follow-ups keep no event log)."""
    return ProgressWriter(
        lambda progress, _event: store.heartbeat_follow_up(follow_up_id, attempt, progress),
        interval)
