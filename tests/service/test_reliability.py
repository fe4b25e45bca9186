"""Durability against real processes: a worker killed with SIGKILL mid-job, the API restarted
mid-job, Redis flushed while jobs wait, a burst of jobs over two workers. The reconciler runs
every second here (stale after 4 s without a heartbeat); a message Redis lost is re-sent once
two passes in a row missed it (the 600 s resend period never comes into play)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import httpx
import pytest
import redis

from app.box import api_command, spawn, stop, wait_ready
from app.dispatch import Dispatcher
from tests.service.conftest import (
    NO_VERIFY,
    REDIS_DB,
    REDIS_HOST,
    REDIS_PORT,
    TERMINAL,
    Box,
    pg_schema,
    start_box,
    tiny_spec,
    wait_status,
)
from tests.service.helpers import download_all

pytestmark = pytest.mark.service

FAST_RECONCILE = {
    "GPTQD_HEARTBEAT_SECONDS": "1",
    "GPTQD_STALE_SECONDS": "4",
    "GPTQD_RECONCILE_SECONDS": "1",
    "GPTQD_RESEND_SECONDS": "600",
    "HF_HUB_OFFLINE": "1",
}
# a job on the 8-block model slow enough to be caught between blocks
DEEP_JOB = tiny_spec(model_id="tiny-deep", verify=NO_VERIFY,
                     calibration={"dataset": "builtin", "num_samples": 32, "seq_length": 128})
# the smallest job there is: two blocks, two windows of 16 tokens, no evaluation
SMALL_JOB = tiny_spec(verify=NO_VERIFY,
                      calibration={"dataset": "builtin", "num_samples": 2, "seq_length": 16})


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[Box]:
    with pg_schema() as url:
        b = start_box(tmp_path_factory.mktemp("reliable"), models_dir,
                      {"GPTQD_DATABASE_URL": url,
                       "GPTQD_BROKER_URL": f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}",
                       **FAST_RECONCILE}, workers=1)
        yield b
        b.close()


def status_events(http: httpx.Client, job_id: str) -> list[dict]:
    from tests.service.helpers import read_events

    return [e for e in read_events(str(http.base_url).rstrip("/"), job_id)
            if e["type"] == "status"]


def wait_progress_block(http: httpx.Client, job_id: str, block: int, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = http.get(f"/jobs/{job_id}").json()
        assert job["status"] in ("queued", "running"), job
        if job["status"] == "running" and (job["progress"]["block"] or 0) >= block:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never reached block {block}")


def test_a_worker_killed_mid_job_is_replaced_and_the_job_resumes(
    box: Box, tmp_path: Path
) -> None:
    http = box.http
    job = http.post("/jobs", json=DEEP_JOB).json()
    # the same job again, run without interruption by the same kind of worker process
    reference = http.post("/jobs", json={**DEEP_JOB, "name": "reference"}).json()
    running = wait_progress_block(http, job["id"], 2)
    worker = box.workers[0]
    os.killpg(worker.pid, signal.SIGKILL)  # the worker and its job process, as the OOM killer would
    worker.wait(10)
    box.workers.remove(worker)
    assert running["attempts"] == 1

    # nothing half-written is listed or served while the job waits for a worker
    for _ in range(10):
        j = http.get(f"/jobs/{job['id']}").json()
        assert j["status"] in ("running", "queued") and j["artifacts"] == []
        assert http.get(f"/jobs/{job['id']}/artifacts").status_code == 409
        assert http.get(f"/jobs/{job['id']}/artifacts/model.safetensors").status_code == 409
        time.sleep(0.2)

    box.add_worker("w-after-kill")
    done = wait_status(http, job["id"], TERMINAL, timeout=240)
    assert done["status"] == "succeeded", done["error"]
    assert done["attempts"] == 2
    statuses = [(e["status"], e["attempts"]) for e in status_events(http, job["id"])]
    assert statuses == [("queued", 0), ("running", 1), ("queued", 1), ("running", 2),
                        ("succeeded", 2)]
    from tests.service.helpers import read_events

    progress = [e for e in read_events(box.url, job["id"]) if e["type"] == "progress"]
    messages = [e["message"] for e in progress]
    assert any(m.startswith("resumed at block") for m in messages), messages
    fractions = [e["fraction"] for e in progress]
    assert fractions == sorted(fractions), "progress went backwards across attempts"

    # the resumed checkpoint is the uninterrupted one, tensor for tensor
    from tests.integration.checkpoints import assert_same_checkpoint

    assert wait_status(http, reference["id"], TERMINAL)["status"] == "succeeded"
    download_all(http, job["id"], tmp_path / "got")
    download_all(http, reference["id"], tmp_path / "ref")
    assert assert_same_checkpoint(tmp_path / "got", tmp_path / "ref") > 0
    leftovers = [p.name for p in (box.data_dir / "artifacts").iterdir() if job["id"] in p.name]
    assert leftovers == [job["id"]]
    assert not (box.data_dir / "work" / job["id"]).exists()


def test_a_worker_killed_mid_verification_is_replaced_and_the_verification_reruns(box: Box) -> None:
    http = box.http
    job = http.post("/jobs", json=SMALL_JOB).json()
    assert wait_status(http, job["id"], TERMINAL)["status"] == "succeeded"
    # long enough to be caught running: thousands of perplexity windows, then generations
    slow = {"max_windows": 10000, "seq_length": 16, "prompts": ["Return the"] * 4, "max_new_tokens": 64}
    v = http.post(f"/jobs/{job['id']}/verifications", json=slow).json()
    deadline = time.monotonic() + 60
    while http.get(f"/jobs/{job['id']}/verifications/{v['id']}").json()["status"] == "queued":
        assert time.monotonic() < deadline, "the verification never started"
        time.sleep(0.05)
    worker = box.workers[0]
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait(10)
    box.workers.remove(worker)
    running = http.get(f"/jobs/{job['id']}/verifications/{v['id']}").json()
    assert running["status"] == "running" and running["attempts"] == 1, running

    box.add_worker("w-after-verification-kill")
    deadline = time.monotonic() + 240
    while (got := http.get(f"/jobs/{job['id']}/verifications/{v['id']}").json())["status"] in (
            "queued", "running"):
        assert time.monotonic() < deadline, got
        time.sleep(0.2)
    assert got["status"] == "succeeded", got["error"]
    assert got["attempts"] == 2
    assert got["result"]["perplexity"] > 1 and len(got["result"]["samples"]) == 4


def test_restarting_the_api_mid_job_loses_nothing(box: Box) -> None:
    http = box.http
    job = http.post("/jobs", json=DEEP_JOB).json()
    wait_progress_block(http, job["id"], 1)
    port = int(box.url.rsplit(":", 1)[1])
    stop(box.api, timeout=10)
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{box.url}/healthz", timeout=2)
    box.api = spawn(api_command("127.0.0.1", port), box.env, box.data_dir / "api.log")
    wait_ready(box.url, timeout=90, proc=box.api)
    done = wait_status(box.http, job["id"], TERMINAL, timeout=240)
    assert done["status"] == "succeeded" and done["attempts"] == 1, done
    statuses = [e["status"] for e in status_events(box.http, job["id"])]
    assert statuses == ["queued", "running", "succeeded"]


def test_flushing_redis_while_jobs_wait_loses_none(box: Box) -> None:
    http = box.http
    busy = http.post("/jobs", json=DEEP_JOB).json()
    wait_progress_block(http, busy["id"], 1)
    waiting = [http.post("/jobs", json=SMALL_JOB).json()["id"] for _ in range(3)]
    r = redis.Redis(REDIS_HOST, REDIS_PORT, db=REDIS_DB)
    assert r.llen(box.queue) == 3  # their messages wait in Redis...
    r.flushdb()  # ...and are gone (our own test db only)
    assert r.llen(box.queue) == 0
    after = http.post("/jobs", json=SMALL_JOB).json()["id"]  # sent while the binding is gone
    flushed = time.monotonic()
    for job_id in [busy["id"], *waiting, after]:
        job = wait_status(http, job_id, TERMINAL, timeout=240)
        assert job["status"] == "succeeded", job
        assert job["attempts"] == 1
    # re-sent within a few reconciler passes, not after the 600 s resend period
    assert time.monotonic() - flushed < 120


def _running_intervals(events: list[dict]) -> list[tuple[datetime, datetime]]:
    out, start = [], None
    for e in events:
        if e["status"] == "running":
            start = datetime.fromisoformat(e["ts"])
        elif start is not None:
            out.append((start, datetime.fromisoformat(e["ts"])))
            start = None
    return out


# each job costs a job process whose imports take seconds (a duplicate message no longer does):
# enough jobs to keep both workers busy and to race their claims, not more
BURST = 6


def test_a_burst_of_jobs_over_two_workers_runs_each_once(box: Box) -> None:
    second = box.add_worker("w-burst")
    try:
        http = box.http
        ids = [http.post("/jobs", json={**SMALL_JOB, "name": f"burst-{i}"}).json()["id"]
               for i in range(BURST)]
        # a duplicate message for every other job: the atomic claim must make it harmless
        from app.settings import Settings
        from worker.celery_app import make_celery

        settings = Settings(broker_url=box.env["GPTQD_BROKER_URL"], queue=box.queue,
                            data_dir=box.data_dir)
        dispatcher = Dispatcher(make_celery(settings), box.queue)
        for job_id in ids[::2]:
            assert dispatcher.send_job(job_id)
        jobs = [wait_status(http, job_id, TERMINAL, timeout=300) for job_id in ids]
        assert [j["status"] for j in jobs] == ["succeeded"] * BURST
        assert all(j["attempts"] == 1 for j in jobs)
        intervals = []
        for job_id in ids:
            statuses = status_events(http, job_id)
            assert [e["status"] for e in statuses] == ["queued", "running", "succeeded"]
            intervals += _running_intervals(statuses)
        # two workers: never more than two jobs running at one time
        edges = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals],
                       key=lambda x: (x[0], x[1]))
        level = peak = 0
        for _, step in edges:
            level += step
            peak = max(peak, level)
        assert peak <= 2
    finally:
        box.remove_worker(second)
