"""The box on its embedded defaults: SQLite store and kombu's SQLAlchemy transport on SQLite
under the data dir. No Redis, no PostgreSQL; the same job must run to the same result."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.service.conftest import TINY, Box, start_box, tiny_spec
from tests.service.helpers import run_full_job

pytestmark = pytest.mark.service


@pytest.fixture(scope="module")
def embedded_box(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[Box]:
    box = start_box(tmp_path_factory.mktemp("embedded"), models_dir, {}, workers=1)
    yield box
    box.close()


def test_embedded_defaults_run_a_job_end_to_end(embedded_box: Box, tmp_path: Path) -> None:
    env = embedded_box.env
    assert env["GPTQD_BROKER_URL"] == "" and env["GPTQD_DATABASE_URL"] == ""
    job = run_full_job(embedded_box.url, tiny_spec(name="embedded"), tmp_path / "ckpt",
                       TINY.layers)
    assert job["status"] == "succeeded"
    # the store and the broker are SQLite files in the data dir
    assert (embedded_box.data_dir / "gptqd.sqlite").is_file()
    assert (embedded_box.data_dir / "broker.sqlite").is_file()
    assert embedded_box.http.get("/readyz").json()["checks"] == {"store": "ok", "broker": "ok"}


def test_the_worker_command_line_takes_one_job_at_a_time() -> None:
    from app.box import worker_command

    cmd = worker_command("w", "q")
    assert cmd[:3] == [sys.executable, "-m", "celery"]
    assert "--concurrency=1" in cmd and "--pool=prefork" in cmd
