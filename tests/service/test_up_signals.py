"""`gptqd up` starts the API and a worker; every signal that stops it stops them all, the
worker's pool process and job processes included."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from app.box import free_port, wait_ready

pytestmark = pytest.mark.service


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_gptqd_up_leaves_no_process_behind(tmp_path: Path, sig: int) -> None:
    port = free_port()
    env = {**os.environ, "GPTQD_DATA_DIR": str(tmp_path), "GPTQD_DATABASE_URL": "",
           "GPTQD_BROKER_URL": "", "GPTQD_API_KEYS": "", "GPTQD_QUEUE": f"up-{port}"}
    log = (tmp_path / "up.log").open("wb")
    up = subprocess.Popen([sys.executable, "-m", "app.cli", "up", "--port", str(port)],
                          env=env, stdout=log, stderr=subprocess.STDOUT)
    started: list[psutil.Process] = []
    try:
        wait_ready(f"http://127.0.0.1:{port}", timeout=90, proc=up)
        deadline = time.monotonic() + 120
        # the worker is up once its first job process is waiting
        while not any("worker.jobprocess" in " ".join(p.cmdline())
                      for p in psutil.Process(up.pid).children(recursive=True)):
            assert up.poll() is None and time.monotonic() < deadline, (
                tmp_path / "up.log").read_text()[-3000:]
            time.sleep(0.2)
        started = psutil.Process(up.pid).children(recursive=True)
        assert len(started) >= 3  # celery's main process, its pool process, a job process
        up.send_signal(sig)
        up.wait(60)
        _, alive = psutil.wait_procs(started, timeout=15)
        assert alive == [], [p.cmdline() for p in alive]
    finally:  # whatever the test saw started, never outlives it
        for proc in [psutil.Process(up.pid), *started] if up.poll() is None else started:
            if proc.is_running():
                proc.kill()
        log.close()
