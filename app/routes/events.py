"""GET /jobs/{id}/events: the job's progress log as server-sent events (resumable)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Request
from fastapi.sse import EventSourceResponse, ServerSentEvent

from app.deps import JobDep, StoreDep
from app.events import event_stream
from app.routes.paging import field_error
from app.routes.refusals import refusals

router = APIRouter(prefix="/jobs", tags=["events"])

MAX_SEQ = 2**31 - 1  # the largest event seq the store's Integer column holds


def resume_after(last_event_id: Annotated[str | None, Header(max_length=20)] = None) -> int:
    """The seq a reconnecting client saw last (0 for a fresh stream). Checked before the
    stream starts, so a bad header is a 422 and not a broken stream."""
    value = (last_event_id or "").strip()
    if not value:
        return 0
    # seqs are 32-bit in the store; a larger number would overflow SQLite's integer binding
    # inside the stream, after the 200 went out
    if not value.isascii() or not value.isdigit() or int(value) > MAX_SEQ:
        raise field_error(("header", "last-event-id"),
                          f"must be an event id (an integer from 0 to {MAX_SEQ})")
    return int(value)


@router.get("/{job_id}/events", response_class=EventSourceResponse, responses=refusals(401, 404))
async def job_events(
    job: JobDep,
    store: StoreDep,
    request: Request,
    after: Annotated[int, Depends(resume_after)],
) -> AsyncIterator[ServerSentEvent]:
    """Events in order, each with `id:` = its sequence number; send `Last-Event-ID` to resume.
    The stream ends after the terminal status event (succeeded, failed or cancelled)."""
    async for event in event_stream(store, job.id, after, request.is_disconnected):
        yield event
