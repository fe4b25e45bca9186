"""Page cursors of every list (jobs, datasets, verifications): the last item's (created_at, id),
as url-safe base64 JSON.

A cursor comes back from the client, so decoding checks it in full: nothing forged (a naive
or out-of-range time, an id with a NUL) may reach the database and fail there as a 500.
"""

from __future__ import annotations

import base64
import json
import re
from datetime import UTC, datetime

from app.schemas import JOB_ID


def encode_cursor(created_at: datetime, item_id: str) -> str:
    raw = json.dumps([created_at.isoformat(), item_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str, shape: re.Pattern[str] = JOB_ID) -> tuple[datetime, str]:
    """(created_at in UTC, id of the given shape); ValueError on anything that is not a
    cursor this list handed out."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        stamp, item_id = json.loads(raw)
        return _cursor_time(stamp), _cursor_id(item_id, shape)
    except Exception as exc:
        raise ValueError("cursor is not one returned by this list (use next_cursor as given)"
                         ) from exc


def _cursor_time(stamp: object) -> datetime:
    """An aware time the store can bind: the store converts it to naive UTC, which must stay
    within years 1..9999 (0001-01-01T00:00+14:00 does not)."""
    if not isinstance(stamp, str):
        raise TypeError("time is not a string")
    when = datetime.fromisoformat(stamp)
    if when.utcoffset() is None:
        raise ValueError("time has no UTC offset")
    return when.astimezone(UTC)  # OverflowError when out of range


def _cursor_id(item_id: object, shape: re.Pattern[str]) -> str:
    if not isinstance(item_id, str) or not shape.match(item_id):
        raise ValueError("not an id of this list")
    return item_id
