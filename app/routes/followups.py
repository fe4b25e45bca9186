"""What verifications and publications (follow-ups of a succeeded job) share at the edge: their
view, the refusal of a job without a checkpoint, and finding one of a job's follow-ups."""

from __future__ import annotations

import re
from typing import TypeVar

from fastapi import HTTPException

from app.deps import has_shape
from app.schemas import ErrorOut, FollowUpOut
from app.store import FollowUp, Job, Store

Out = TypeVar("Out", bound=FollowUpOut)


def follow_up_view(item: FollowUp, out: type[Out]) -> Out:
    error = (ErrorOut(code=item.error_code, message=item.error_message or "")
             if item.error_code else None)
    return out(id=item.id, job_id=item.job_id, status=item.status, spec=item.spec,
               created_at=item.created_at, finished_at=item.finished_at,
               attempts=item.attempts or 0, progress=item.progress, result=item.result,
               error=error)


def require_checkpoint(job: Job) -> None:
    if job.status != "succeeded":
        raise HTTPException(
            409, f"job {job.id} is {job.status}: only a succeeded job has a checkpoint")


def job_follow_up(store: Store, job: Job, item_id: str, shape: re.Pattern[str],
                  kind: str) -> FollowUp:
    """The job's follow-up of that kind with that id, or a 404 naming it."""
    item = store.get_follow_up(item_id) if has_shape(shape, item_id) else None
    if item is None or item.job_id != job.id or (item.kind or "verification") != kind:
        raise HTTPException(404, f"{kind} {item_id} not found")
    return item
