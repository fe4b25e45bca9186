"""Many dashboards polling one box: latency of GET /jobs/{id} and GET /jobs under 50 concurrent
clients while a job runs, then 200 event streams held open at once.

Starts its own box (API + one worker, embedded defaults, a temp data dir) unless --url is given,
submits a long job on a tiny model so there is something to watch, and prints a markdown table.

    .venv/bin/python bench/api_load.py [--clients 50] [--seconds 20] [--streams 200]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from app.box import api_command, free_port, spawn, stop, wait_ready, worker_command
from app.tinymodel import TinySpec, build_tiny_llama

LONG_JOB = {
    "model_id": "bench-model",
    "name": "load-target",
    "group_size": 32,
    "calibration": {"dataset": "builtin", "num_samples": 128, "seq_length": 512},
    "verify": {"perplexity": False, "max_new_tokens": 0},
}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def poll(client: httpx.AsyncClient, path: str, until: float, interval: float,
               out: list[float], errors: list[str]) -> None:
    """One dashboard: a request every `interval` seconds (0: back to back), starting at a random
    phase: dashboards opened at different moments do not poll in lockstep."""
    next_at = time.monotonic() + random.uniform(0, interval)
    while time.monotonic() < until:
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        next_at += interval
        start = time.perf_counter()
        try:
            r = await client.get(path)
            if r.status_code != 200:
                errors.append(f"{path}: HTTP {r.status_code}")
        except httpx.HTTPError as exc:
            errors.append(f"{path}: {exc!r}")
            continue
        out.append((time.perf_counter() - start) * 1000)


async def pollers(url: str, job_id: str, clients: int, seconds: float,
                  interval: float) -> dict[str, dict]:
    results: dict[str, dict] = {}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        for path in (f"/jobs/{job_id}", "/jobs?limit=20"):
            lat: list[float] = []
            errors: list[str] = []
            until = time.monotonic() + seconds
            await asyncio.gather(
                *(poll(client, path, until, interval, lat, errors) for _ in range(clients))
            )
            results[path.split("?")[0].replace(job_id, "{id}")] = {
                "requests": len(lat), "errors": len(errors), "rps": len(lat) / seconds,
                "p50": statistics.median(lat), "p99": percentile(lat, 0.99),
                "max": max(lat),
            }
    return results


async def hold_streams(url: str, job_id: str, streams: int, seconds: float) -> dict:
    opened, errors, events = 0, [], 0

    async def one(client: httpx.AsyncClient) -> None:
        nonlocal opened, events
        try:
            async with client.stream("GET", f"/jobs/{job_id}/events") as r:
                if r.status_code != 200:
                    errors.append(f"HTTP {r.status_code}")
                    return
                opened += 1
                deadline = time.monotonic() + seconds
                async for line in r.aiter_lines():
                    if line.startswith("id:"):
                        events += 1
                    if time.monotonic() > deadline:
                        break
        except httpx.HTTPError as exc:
            errors.append(repr(exc))

    limits = httpx.Limits(max_connections=streams + 10)
    timeout = httpx.Timeout(30, read=seconds + 30)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        await asyncio.gather(*(one(client) for _ in range(streams)))
    return {"streams": streams, "opened": opened, "errors": len(errors), "events": events,
            "first_error": errors[0] if errors else ""}


def start_box(data_dir: Path) -> tuple[str, list]:
    models = data_dir / "models"
    build_tiny_llama(models / "bench-model", TinySpec(hidden=256, intermediate=512, layers=16,
                                                      heads=4, vocab=512))
    env = {"GPTQD_DATA_DIR": str(data_dir), "GPTQD_MODELS_DIR": str(models),
           "GPTQD_QUEUE": "bench"}
    port = free_port()
    api = spawn(api_command("127.0.0.1", port), env, data_dir / "api.log")
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, timeout=90, proc=api)
    worker = spawn(worker_command("bench", "bench"), env, data_dir / "worker.log")
    return url, [worker, api]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", help="an existing box (default: start one)")
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--streams", type=int, default=200)
    ap.add_argument("--interval", type=float, default=1.0,
                    help="seconds between one client's polls (dashboards poll; 0 = flood)")
    args = ap.parse_args()

    procs: list = []
    with tempfile.TemporaryDirectory(prefix="gptqd-bench-") as tmp:
        try:
            url = args.url
            if url is None:
                url, procs = start_box(Path(tmp))
            job = httpx.post(f"{url}/jobs", json=LONG_JOB, timeout=30).json()
            deadline = time.monotonic() + 120
            while httpx.get(f"{url}/jobs/{job['id']}").json()["status"] == "queued":
                if time.monotonic() > deadline:
                    raise SystemExit("the job did not start within 120 s")
                time.sleep(0.5)
            polled = asyncio.run(
                pollers(url, job["id"], args.clients, args.seconds, args.interval)
            )
            after_polls = httpx.get(f"{url}/jobs/{job['id']}").json()["status"]
            held = asyncio.run(hold_streams(url, job["id"], args.streams, min(args.seconds, 15)))
            status = httpx.get(f"{url}/jobs/{job['id']}").json()["status"]
        finally:
            for proc in procs:
                stop(proc, timeout=20)

    every = f"every {args.interval:g} s" if args.interval else "back to back"
    print(f"\n{args.clients} concurrent pollers ({every}) for {args.seconds:.0f} s per endpoint, "
          f"job running at the start, {after_polls} after the pollers, {status} at the end\n")
    print("| endpoint | requests | req/s | errors | p50 ms | p99 ms | max ms |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for path, r in polled.items():
        print(f"| GET {path} | {r['requests']} | {r['rps']:.0f} | {r['errors']} | "
              f"{r['p50']:.1f} | {r['p99']:.1f} | {r['max']:.1f} |")
    print(f"\n| event streams | opened | errors | events received |\n|---:|---:|---:|---:|\n"
          f"| {held['streams']} | {held['opened']} | {held['errors']} | {held['events']} |")
    if held["first_error"]:
        print(f"\nfirst stream error: {held['first_error']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
