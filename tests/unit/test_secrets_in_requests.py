"""Key secrets as the server reads and logs them: the Authorization header is compared exactly
(only ASCII space and tab around it are dropped, not Unicode spaces), and uvicorn's access log
never writes a query string or a configured secret."""

from __future__ import annotations

import logging

import pytest

from app import accesslog
from app.auth import bearer_secret

SECRET = "sk-alice-7f3a9c"
ACCESS_FORMAT = '%s - "%s %s HTTP/%s" %d'  # uvicorn's access log call


@pytest.mark.parametrize("header", [f"Bearer {SECRET}", f"bearer {SECRET}",
                                    f"Bearer   {SECRET}", f"Bearer {SECRET} \t",
                                    f" \tBearer {SECRET}"])
def test_ascii_space_and_tab_around_the_secret_are_dropped(header: str) -> None:
    assert bearer_secret(header) == SECRET.encode()


@pytest.mark.parametrize("space", ["\xa0", "\x85", "\u2003", "\x1c", "\x0b", "\x0c"])
def test_other_whitespace_is_part_of_the_secret(space: str) -> None:
    for header in (f"Bearer {SECRET}{space}", f"Bearer {space}{SECRET}"):
        got = bearer_secret(header.encode("utf-8").decode("latin-1"))  # as Starlette decodes
        assert got != SECRET.encode(), repr(header)


@pytest.mark.parametrize("header", ["", "Bearer", "Bearer ", "Bearer \t ", SECRET,
                                    f"Basic {SECRET}", f"Bearer\t{SECRET}"])
def test_no_bearer_secret(header: str) -> None:
    assert bearer_secret(header) is None


def test_a_secret_is_read_as_the_bytes_the_client_sent() -> None:
    sent = "sk-ünï".encode()
    assert bearer_secret("Bearer " + sent.decode("latin-1")) == sent


def access_line(target: str, secrets: list[str]) -> str:
    record = logging.LogRecord(accesslog.ACCESS_LOGGER, logging.INFO, __file__, 1,
                               ACCESS_FORMAT, ("127.0.0.1:5000", "GET", target, "1.1", 401),
                               None)
    assert accesslog.RedactingFilter(secrets).filter(record)
    return record.getMessage()


@pytest.mark.parametrize("target", [f"/jobs?api_key={SECRET}", f"/jobs?{SECRET}",
                                    f"/jobs?status=queued&token={SECRET}&limit=5",
                                    f"/jobs?api_key={SECRET.replace('-', '%2D')}"])
def test_the_access_log_drops_every_query_string(target: str) -> None:
    line = access_line(target, [])
    assert line == f'127.0.0.1:5000 - "GET /jobs?{accesslog.REDACTED} HTTP/1.1" 401'


@pytest.mark.parametrize("target", [f"/jobs/{SECRET}", f"/jobs/{SECRET}/events",
                                    "/jobs/sk%3Aalice%3Aweird"])
def test_the_access_log_masks_a_configured_secret_in_the_path(target: str) -> None:
    line = access_line(target, [SECRET, "sk:alice:weird"])
    assert SECRET not in line and "weird" not in line and accesslog.REDACTED in line


def test_a_plain_path_is_logged_as_it_is() -> None:
    assert '"GET /jobs/job_1 HTTP/1.1" 401' in access_line("/jobs/job_1", [SECRET])


def test_install_keeps_one_filter_with_the_latest_secrets() -> None:
    logger = logging.getLogger(accesslog.ACCESS_LOGGER)
    before = list(logger.filters)
    try:
        accesslog.install(["one"])
        accesslog.install(["two"])
        mine = [f for f in logger.filters if isinstance(f, accesslog.RedactingFilter)]
        assert len(mine) == 1 and mine[0].secrets == ["two"]
    finally:
        logger.filters[:] = before
