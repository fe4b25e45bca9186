"""Jobs and verifications run in processes that start clean (worker/jobprocess.py), whatever
the worker's own processes imported: the failure first seen on a GPU box, where a library that
initialised CUDA at import made every forked job process fail ("Cannot re-initialize CUDA in
forked subprocess"), is simulated here by tests/forkpoison, imported by every Python process of
the box: a child forked from any of them fails at its first torch computation.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from app.box import spawn, stop, worker_command
from tests.service.conftest import NO_VERIFY, TERMINAL, TINY, Box, start_box, tiny_spec, wait_status
from tests.service.helpers import job_processes, run_full_job, verify_stored, wait_for

pytestmark = pytest.mark.service

POISON = Path(__file__).parents[1] / "forkpoison"
# the smallest job there is: two blocks, two windows of 16 tokens, no evaluation
SMALL_JOB = tiny_spec(verify=NO_VERIFY,
                      calibration={"dataset": "builtin", "num_samples": 2, "seq_length": 16})
DEEP_JOB = tiny_spec(model_id="tiny-deep", verify=NO_VERIFY,
                     calibration={"dataset": "builtin", "num_samples": 32, "seq_length": 128})


@pytest.fixture(scope="module")
def poisoned_box(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[Box]:
    path = os.pathsep.join(p for p in (str(POISON), os.environ.get("PYTHONPATH")) if p)
    box = start_box(tmp_path_factory.mktemp("poisoned"), models_dir,
                    {"PYTHONPATH": path, "HF_HUB_OFFLINE": "1"}, workers=1)
    yield box
    box.close()


def test_the_poison_breaks_a_forked_child_and_spares_an_execd_one() -> None:
    """The simulation is real: without clean job processes, the tests below fail."""
    code = ("import os, sys, subprocess, torch\n"
            "from torch import nn\n"
            "pid = os.fork()\n"
            "if pid == 0:\n"
            "    try:\n"
            "        nn.Linear(2, 2)(torch.ones(2))\n"
            "    except RuntimeError as e:\n"
            "        os._exit(3 if 'forked subprocess' in str(e) else 4)\n"
            "    os._exit(0)\n"
            "forked = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])\n"
            "execd = subprocess.run([sys.executable, '-c', 'import torch; from torch import nn;"
            " nn.Linear(2, 2)(torch.ones(2))']).returncode\n"
            "print(forked, execd)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(POISON)}, check=True)
    assert done.stdout.split() == ["3", "0"], done.stderr


def test_a_worker_whose_forks_are_poisoned_runs_a_job_and_a_verification(
        poisoned_box: Box, tmp_path: Path) -> None:
    job = run_full_job(poisoned_box.url, tiny_spec(name="clean"), tmp_path / "ckpt", TINY.layers)
    assert job["metrics"]["device"] == "cpu"
    verify_stored(poisoned_box.http, job)


def test_a_solo_worker_runs_jobs_in_clean_processes_too(poisoned_box: Box) -> None:
    log = poisoned_box.data_dir / "solo.log"
    solo = spawn(worker_command("solo", poisoned_box.queue, pool="solo"), poisoned_box.env, log)
    prefork = poisoned_box.workers[0]
    try:
        wait_for("solo worker ready", lambda: "ready." in log.read_text(errors="replace"), 120)
        # its first job process starts with the worker, before any job
        wait_for("a waiting job process", lambda: job_processes(solo))
        poisoned_box.remove_worker(prefork)
        for _ in range(2):  # the second job runs in the process started as the first began
            job = poisoned_box.http.post("/jobs", json=SMALL_JOB).json()
            done = wait_status(poisoned_box.http, job["id"], TERMINAL)
            assert done["status"] == "succeeded", done["error"]
        assert solo.poll() is None
    finally:
        stop(solo, timeout=20)
        if prefork not in poisoned_box.workers:
            poisoned_box.add_worker("w-after-solo")


def test_a_killed_job_process_is_requeued_at_once_and_the_worker_lives_on(
        poisoned_box: Box) -> None:
    http = poisoned_box.http
    worker = poisoned_box.workers[0]
    job = http.post("/jobs", json=DEEP_JOB).json()
    wait_for("block 2", lambda: (http.get(f"/jobs/{job['id']}").json()["progress"]["block"]
                                 or 0) >= 2, 120)
    # the job's process, and the next job's, started as this one began
    procs = job_processes(worker)
    assert len(procs) == 2, procs
    running = min(procs, key=lambda p: p.create_time())
    killed = time.monotonic()
    running.send_signal(signal.SIGKILL)  # as the kernel's OOM killer would
    # requeued by the worker that saw it die, long before the 60 s heartbeat staleness
    wait_for("requeued", lambda: http.get(f"/jobs/{job['id']}").json()["attempts"] >= 2
             or http.get(f"/jobs/{job['id']}").json()["status"] == "queued", 30)
    assert time.monotonic() - killed < 30
    done = wait_status(http, job["id"], TERMINAL, timeout=240)
    assert done["status"] == "succeeded", done["error"]
    assert done["attempts"] == 2
    assert worker.poll() is None


def test_a_duplicate_message_leaves_the_waiting_job_process_for_the_next_job(
        poisoned_box: Box) -> None:
    from app.dispatch import Dispatcher
    from app.settings import Settings
    from worker.celery_app import make_celery

    http, worker = poisoned_box.http, poisoned_box.workers[0]
    job = http.post("/jobs", json=SMALL_JOB).json()
    assert wait_status(http, job["id"], TERMINAL)["status"] == "succeeded"
    # the job's own process is gone once its end is recorded and reaped; the next one waits
    waiting = wait_for("the next job's process alone",
                       lambda: procs if len(procs := job_processes(worker)) == 1 else None)
    settings = Settings(broker_url=poisoned_box.env["GPTQD_BROKER_URL"],
                        queue=poisoned_box.queue, data_dir=poisoned_box.data_dir)
    assert Dispatcher(make_celery(settings), poisoned_box.queue).send_job(job["id"])
    skipped = f"job {job['id']} is not queued; skipping"
    wait_for("the duplicate skipped", lambda: any(
        skipped in log.read_text(errors="replace") for log in poisoned_box.data_dir.glob("*.log")))
    # the same process still waits: the skip did not spend it
    assert [p.pid for p in job_processes(worker)] == [p.pid for p in waiting]


def test_stopping_a_worker_stops_its_job_processes(poisoned_box: Box) -> None:
    proc = poisoned_box.add_worker("w-stopped")
    waiting = wait_for("a waiting job process", lambda: job_processes(proc))
    assert waiting[0].environ().get("GPTQD_JOB_PARENT")
    poisoned_box.remove_worker(proc)  # SIGTERM to the worker alone, as `docker stop` does
    _, alive = psutil.wait_procs(waiting, timeout=10)
    assert alive == []


def test_a_worker_refuses_to_start_when_the_asked_device_does_not_work(
        poisoned_box: Box) -> None:
    log = poisoned_box.data_dir / "cuda.log"
    proc = spawn(worker_command("cuda", poisoned_box.queue),
                 {**poisoned_box.env, "GPTQD_DEVICE": "cuda"}, log)
    try:
        code = proc.wait(180)
    finally:
        stop(proc)
    text = log.read_text(errors="replace")
    assert code == 78, text[-2000:]
    assert "GPTQD_DEVICE=cuda" in text and "does not work on this machine" in text, text[-2000:]
    assert "Traceback" not in text
    assert "ready." not in text  # it never took a job
