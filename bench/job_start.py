"""How long a job waits between reaching a worker and starting: from the worker's
"Task gptqd.run_job[...] received" log line to the job's first progress event.

Two cases: a job sent to an idle worker (its job process has already imported the engine), and
jobs queued back to back (each arrives as the one before it ends; its process was started when
that one began, so a job shorter than a process's imports leaves the next one waiting for the
rest of them: the table shows how long the jobs ran). Starts its own box (API + one prefork
worker, embedded defaults, a temp data dir) on a tiny 8-block model, runs each job without
evaluation, and prints a markdown table.

    .venv/bin/python bench/job_start.py [--jobs 3]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
import time
from datetime import datetime
from pathlib import Path

import httpx

from app.box import api_command, free_port, spawn, stop, wait_ready, worker_command
from app.tinymodel import TinySpec, build_tiny_llama

JOB = {"model_id": "bench-model", "group_size": 32,
       "calibration": {"dataset": "builtin", "num_samples": 64, "seq_length": 128},
       "verify": {"perplexity": False, "max_new_tokens": 0}}
RECEIVED = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): INFO/MainProcess\] "
                      r"Task gptqd\.run_job\[[^\]]+\] received", re.M)
IDLE_SECONDS = 15.0  # enough for a waiting job process to finish its imports


def received_times(log: Path) -> list[datetime]:
    """When the worker received each job, in order (local time in the log, made aware)."""
    return [datetime.strptime(m, "%Y-%m-%d %H:%M:%S,%f").astimezone()
            for m in RECEIVED.findall(log.read_text(errors="replace"))]


def first_progress(http: httpx.Client, job_id: str) -> datetime:
    from app.client import parse_sse

    with http.stream("GET", f"/jobs/{job_id}/events") as r:
        for ev in parse_sse(r.iter_lines()):
            data = json.loads(ev["data"])
            if data["type"] == "progress":
                return datetime.fromisoformat(data["ts"])
    raise AssertionError(f"job {job_id} has no progress event")


def wait_done(http: httpx.Client, job_id: str, timeout: float = 300) -> float:
    """Waits for the job to succeed; how long it ran."""
    deadline = time.monotonic() + timeout
    while (job := http.get(f"/jobs/{job_id}").json())["status"] not in (
            "succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, job
        time.sleep(0.2)
    assert job["status"] == "succeeded", job["error"]
    return (datetime.fromisoformat(job["finished_at"])
            - datetime.fromisoformat(job["started_at"])).total_seconds()


def run(jobs: int) -> dict[str, tuple[list[float], list[float]]]:
    """Per case: (delays from task received to first progress, job durations)."""
    with tempfile.TemporaryDirectory(prefix="gptqd-jobstart-") as tmp:
        data = Path(tmp)
        build_tiny_llama(data / "models" / "bench-model", TinySpec(layers=8))
        env = {"GPTQD_DATA_DIR": str(data), "GPTQD_MODELS_DIR": str(data / "models"),
               "GPTQD_DATABASE_URL": "", "GPTQD_BROKER_URL": "", "GPTQD_API_KEYS": "",
               "GPTQD_QUEUE": "bench-jobstart"}
        port = free_port()
        api = spawn(api_command("127.0.0.1", port), env, data / "api.log")
        log = data / "worker.log"
        worker = spawn(worker_command("bench", "bench-jobstart"), env, log)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_ready(url, proc=api)
            http = httpx.Client(base_url=url, timeout=30)
            idle, durations = [], []
            for _ in range(jobs):
                time.sleep(IDLE_SECONDS)
                idle.append(http.post("/jobs", json=JOB).json()["id"])
                durations.append(wait_done(http, idle[-1]))
            queued = [http.post("/jobs", json=JOB).json()["id"] for _ in range(jobs)]
            durations += [wait_done(http, job_id) for job_id in queued]
            got = received_times(log)
            assert len(got) == 2 * jobs, f"{len(got)} jobs received, {2 * jobs} sent"
            delays = [(first_progress(http, j) - t).total_seconds()
                      for j, t in zip(idle + queued, got, strict=True)]
            return {"idle worker": (delays[:jobs], durations[:jobs]),
                    "queued back to back": (delays[jobs:], durations[jobs:])}
        finally:
            stop(worker, timeout=20)
            stop(api)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=3, help="jobs per case")
    args = parser.parse_args()
    results = run(args.jobs)
    print("| case | jobs | task received -> first progress: median | max | job runs (median) |")
    print("|---|---:|---:|---:|---:|")
    for case, (delays, durations) in results.items():
        print(f"| {case} | {len(delays)} | {statistics.median(delays):.2f} s "
              f"| {max(delays):.2f} s | {statistics.median(durations):.1f} s |")


if __name__ == "__main__":
    main()
