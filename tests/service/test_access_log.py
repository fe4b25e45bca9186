"""A key sent in the URL never reaches the log: the server is started as `gptqd serve` runs
it and as the uvicorn command runs it, both with uvicorn's access log on; requests carry a
secret in the query string (refused: keys are read from the header only) and in the path, and
the log written meanwhile is read back."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.box import api_command, free_port, spawn, stop, wait_ready

pytestmark = pytest.mark.service

SECRET = "sk-alice-in-the-url-0c1d"
OTHER = "sk-unknown-key-9e8f"  # not a key of this server: its query must not be logged either
TARGETS = [f"/jobs?api_key={SECRET}", f"/jobs?status=queued&token={SECRET}&limit=5",
           f"/jobs?{SECRET}", f"/metrics?access_token={SECRET}", f"/jobs?api_key={OTHER}",
           f"/jobs/{SECRET}", f"/jobs/job_1/events?key={SECRET}"]


def serve_command(host: str, port: int) -> list[str]:
    """`gptqd serve`, which runs uvicorn with its defaults (access log on, level info)."""
    return [sys.executable, "-m", "app.cli", "serve", "--host", host, "--port", str(port)]


def uvicorn_command(host: str, port: int) -> list[str]:
    return api_command(host, port, log_level="info")


@pytest.fixture(params=[serve_command, uvicorn_command], ids=["gptqd-serve", "uvicorn"])
def logged_requests(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Starts the server, sends TARGETS with a valid key in the header and without one, stops
    it and yields everything it logged."""
    port, log = free_port(), tmp_path / "api.log"
    env = {"GPTQD_DATA_DIR": str(tmp_path / "data"), "GPTQD_DATABASE_URL": "",
           "GPTQD_BROKER_URL": "", "GPTQD_API_KEYS": f"alice:{SECRET}",
           "GPTQD_ADMIN_KEYS": ""}
    proc = spawn(request.param("127.0.0.1", port), env, log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, timeout=90, proc=proc)
        with httpx.Client(base_url=url, timeout=30) as anon, httpx.Client(
                base_url=url, timeout=30, headers={"Authorization": f"Bearer {SECRET}"}) as alice:
            for target in TARGETS:
                assert anon.get(target).status_code == 401, target
                assert alice.get(target).status_code < 500, target
    finally:
        stop(proc, timeout=20)
    yield log.read_text(errors="replace")


def test_no_secret_in_the_access_log(logged_requests: str) -> None:
    assert '"GET /readyz HTTP/1.1" 200' in logged_requests  # the access log was on
    assert '"GET /jobs?[redacted] HTTP/1.1" 401' in logged_requests
    assert '"GET /jobs/[redacted] HTTP/1.1" 401' in logged_requests
    for secret in (SECRET, OTHER, "in-the-url", "unknown-key"):
        assert secret not in logged_requests, secret
