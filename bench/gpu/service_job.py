"""The service end to end: `gptqd up` (embedded store and broker), upload the calibration text,
POST /jobs, follow the job to its end, list its artifacts with sha256 and check the device its
metrics name. Prints one line SVC_JSON:{...}; exits 0 only when all of that held.

usage: service_job.py --models-dir DIR --model NAME --data-dir DIR --calibration FILE
                      --num-samples N --seq-length L --expect-device cuda|cpu --timeout S
                      [--preload DIR ...]   (prepended to PYTHONPATH of `gptqd up` only)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import httpx

from app.box import free_port, spawn, stop, wait_ready
from app.client import ApiError, Client

TERMINAL = ("succeeded", "failed", "cancelled")
PRELOAD_MARK = "gpu_preload["  # what bench/gpu_preload/sitecustomize.py prints per process


def start_box(args: argparse.Namespace, port: int):
    env = {"GPTQD_DATA_DIR": str(args.data_dir), "GPTQD_MODELS_DIR": str(args.models_dir)}
    if args.preload:
        env["PYTHONPATH"] = os.pathsep.join([*args.preload, os.environ.get("PYTHONPATH", "")])
    args.data_dir.mkdir(parents=True, exist_ok=True)
    return spawn([sys.executable, "-m", "app.cli", "up", "--host", "127.0.0.1", "--port", str(port)],
                 env=env, log_path=args.data_dir / "up.log")


def follow(client: Client, job_id: str, limit: float) -> dict:
    """Polls the job until it ends or limit seconds pass; prints each change of status/stage."""
    start, seen, job = time.monotonic(), None, {}
    while time.monotonic() - start < limit:
        job = client.job(job_id)
        now = (job["status"], (job.get("progress") or {}).get("stage"))
        if now != seen:
            print(f"[{time.monotonic() - start:6.1f} s] {now[0]} {now[1] or ''}", flush=True)
            seen = now
        if job["status"] in TERMINAL:
            break
        time.sleep(1.0)
    return job


def check_job(client: Client, job: dict, expect_device: str) -> tuple[list[dict], str | None]:
    """(artifacts, None) when the job succeeded on the expected device with a checkpoint
    listed; otherwise what was wrong."""
    if job.get("status") != "succeeded":
        err = job.get("error") or {}
        return [], f"job {job.get('status')}: {err.get('code', '')} {err.get('message', '')}"[:300]
    artifacts = client.artifacts(job["id"])
    for art in artifacts:
        print(f"  {art['sha256']}  {art['size']:>12}  {art['name']}", flush=True)
    names = {a["name"] for a in artifacts}
    if "config.json" not in names or not any(n.endswith(".safetensors") for n in names):
        return artifacts, f"no config.json or .safetensors among {sorted(names)}"
    device = str((job.get("metrics") or {}).get("device"))
    if device.split(":")[0] != expect_device:
        return artifacts, f"metrics.device is {device}, expected {expect_device}"
    return artifacts, None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models-dir", type=Path, required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data-dir", type=Path, required=True)
    ap.add_argument("--calibration", type=Path, required=True)
    ap.add_argument("--num-samples", type=int, default=32)
    ap.add_argument("--seq-length", type=int, default=256)
    ap.add_argument("--expect-device", default="cuda")
    ap.add_argument("--timeout", type=float, default=150)
    ap.add_argument("--preload", action="append", default=[])
    args = ap.parse_args()

    start = time.monotonic()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    result: dict = {"ok": False, "preload": args.preload}
    box = start_box(args, port)
    try:
        wait_ready(url, timeout=90, proc=box)
        result["up_s"] = round(time.monotonic() - start, 1)
        client = Client(url)
        dataset = client.upload_dataset(args.calibration)
        job = client.submit({
            "model_id": args.model, "bits": 4, "group_size": 128, "damp_percent": 0.01,
            "calibration": {"dataset_id": dataset["id"], "num_samples": args.num_samples,
                            "seq_length": args.seq_length},
        })
        result["job_id"] = job["id"]
        posted = time.monotonic()
        job = follow(client, job["id"], args.timeout - (posted - start) - 15)
        result["job_s"] = round(time.monotonic() - posted, 1)
        result["status"] = job.get("status")
        metrics = job.get("metrics") or {}
        result["metrics"] = {k: metrics.get(k) for k in
                             ("device", "duration_seconds", "stage_seconds", "peak_memory")}
        result["artifacts"], result["reason"] = check_job(client, job, args.expect_device)
        result["ok"] = result["reason"] is None
    except (ApiError, httpx.HTTPError, OSError, RuntimeError, TimeoutError) as exc:
        result["reason"] = f"{type(exc).__name__}: {exc}"[:300]
    finally:
        stop(box, timeout=30)
        log = args.data_dir / "up.log"
        marks = [ln for ln in log.read_text(errors="replace").splitlines()
                 if ln.startswith(PRELOAD_MARK)] if log.exists() else []
        result["preload_processes"] = len(marks)
        result["preload_first"] = marks[0] if marks else None
    print("SVC_JSON:" + json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
