"""Starting and stopping the box's processes (API server, Celery workers) as subprocesses.

`gptqd up`, the demo and the service tests all start the same commands through here.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def api_command(host: str, port: int, log_level: str = "warning") -> list[str]:
    return [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory",
            "--host", host, "--port", str(port), "--log-level", log_level]


def worker_command(name: str, queue: str, pool: str = "prefork",
                   loglevel: str = "INFO") -> list[str]:
    """One job at a time; each job runs in a clean process of its own (worker/jobprocess.py)."""
    cmd = [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker",
           f"--loglevel={loglevel}", f"--pool={pool}", "--concurrency=1", "-Q", queue,
           "-n", f"{name}@%h", "--without-gossip", "--without-mingle"]
    return cmd


def spawn(cmd: list[str], env: dict[str, str] | None = None,
          log_path: Path | None = None) -> subprocess.Popen:
    """Starts cmd in its own process group (so stop() reaches its children too)."""
    out = log_path.open("ab") if log_path is not None else None
    try:
        return subprocess.Popen(
            cmd, env={**os.environ, **(env or {})}, stdout=out,
            stderr=subprocess.STDOUT if out else None, start_new_session=True,
        )
    finally:
        if out is not None:
            out.close()  # the child holds its own descriptor


def stop(proc: subprocess.Popen, timeout: float = 10.0, sig: int = signal.SIGTERM) -> None:
    """Sends sig to the process (which stops its own children), waits up to timeout, then
    SIGKILLs whatever is left of its process group."""
    if proc.poll() is None:
        proc.send_signal(sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


def wait_ready(url: str, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    """Polls url/readyz until it answers 200; raises if proc exits or time runs out."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the API server exited with code {proc.returncode}")
        try:
            r = httpx.get(f"{url}/readyz", timeout=2)
            if r.status_code == 200:
                return
            last = r.text
        except httpx.HTTPError as exc:
            last = str(exc)
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {timeout:.0f}s: {last}")
