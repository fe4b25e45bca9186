"""Page cursors: what the store hands out decodes back, and nothing forged decodes at all
(a forged one used to reach the database: naive times, years out of range, NULs)."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta, timezone

import pytest

from app.cursor import decode_cursor, encode_cursor
from app.schemas import DATASET_ID, JOB_ID, VERIFICATION_ID
from app.store import new_id

JOB = "job_" + "0123456789abcdef" * 2


def forged(*parts: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(parts).encode()).decode().rstrip("=")


def test_a_cursor_decodes_to_what_was_encoded() -> None:
    when = datetime(2026, 3, 1, 12, 30, 15, 123456, tzinfo=UTC)
    assert decode_cursor(encode_cursor(when, JOB)) == (when, JOB)


def test_a_cursor_time_comes_back_in_utc() -> None:
    east = datetime(2026, 3, 1, 14, 0, tzinfo=timezone(timedelta(hours=2)))
    stamp, _ = decode_cursor(forged(east.isoformat(), JOB))
    assert stamp == east and stamp.utcoffset() == timedelta(0)


@pytest.mark.parametrize("stamp", ["0001-01-01T00:00:00+00:00", "9999-12-31T23:59:59.999999Z",
                                   "0001-01-01T12:00:00+12:00"])
def test_the_ends_of_the_range_decode(stamp: str) -> None:
    assert decode_cursor(forged(stamp, JOB))[0].year in (1, 9999)


@pytest.mark.parametrize("parts", [
    ("2999-01-01T00:00:00", "zzz"),                  # naive time (was a 500)
    ("2999-01-01T00:00:00", JOB),                    # naive time, real id
    ("0001-01-01T00:00:00+14:00", JOB),              # year 0 in UTC (OverflowError)
    ("9999-12-31T23:59:59-14:00", JOB),              # year 10000 in UTC
    ("2999-01-01T00:00:00+00:00", "job_\x00"),       # NUL in the id (PostgreSQL refuses)
    ("2999-01-01T00:00:00+00:00", JOB + "\x00"),
    ("2999-01-01T00:00:00+00:00", JOB.upper()),
    ("2999-01-01T00:00:00+00:00", 5),
    ("2999-01-01T00:00:00+00:00", None),
    (12345, JOB),
    ("not a time", JOB),
    ("2999-01-01T00:00:00+00:00",),
    ("2999-01-01T00:00:00+00:00", JOB, "extra"),
])
def test_a_forged_cursor_is_refused(parts: tuple) -> None:
    with pytest.raises(ValueError, match="cursor"):
        decode_cursor(forged(*parts))


@pytest.mark.parametrize("raw", ["", "!!!", "\x00", "e30", "W10", "bnVsbA", "WyJ4Il0",
                                 "a" * 500])
def test_a_cursor_that_is_not_base64_json_is_refused(raw: str) -> None:
    with pytest.raises(ValueError, match="cursor"):
        decode_cursor(raw)


def test_new_ids_have_the_shapes_paths_are_checked_against() -> None:
    for prefix, shape in (("job", JOB_ID), ("ver", VERIFICATION_ID), ("ds", DATASET_ID)):
        assert shape.fullmatch(new_id(prefix)), prefix
