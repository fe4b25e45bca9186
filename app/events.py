"""The job's event log as server-sent events.

Each event's `id:` is its per-job sequence number (1, 2, 3, ... with no gaps, committed in
order), so a client reconnecting with `Last-Event-ID: n` gets exactly the events after n.
The stream ends after the job's terminal status event.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from anyio import to_thread
from fastapi.sse import ServerSentEvent

from app.schemas import TERMINAL
from app.store import Event, Store

POLL_SECONDS = 0.3


def is_terminal(event: Event) -> bool:
    return event.type == "status" and event.data.get("status") in TERMINAL


def to_sse(event: Event) -> ServerSentEvent:
    data = {"seq": event.seq, "type": event.type, "ts": event.ts.isoformat(), **event.data}
    return ServerSentEvent(id=str(event.seq), event=event.type, data=data)


async def event_stream(
    store: Store,
    job_id: str,
    after: int,
    disconnected: Callable[[], object],
    poll: float = POLL_SECONDS,
) -> AsyncIterator[ServerSentEvent]:
    last = after
    while True:
        events = await to_thread.run_sync(store.events_after, job_id, last)
        for event in events:
            last = event.seq
            yield to_sse(event)
            if is_terminal(event):
                return
        if not events:
            job = await to_thread.run_sync(store.get_job, job_id)
            # deleted, or a resume that starts after the terminal event: nothing more will come
            if job is None or (job.status in TERMINAL and job.event_seq <= last):
                return
            if await disconnected():
                return
            await asyncio.sleep(poll)
