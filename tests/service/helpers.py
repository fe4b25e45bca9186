"""What the service tests check about a job, shared by the Redis/PostgreSQL box and the
embedded-defaults box."""

from __future__ import annotations

import hashlib
import io
import json
import socket
import subprocess
import tarfile
import threading
import time
from pathlib import Path

import httpx
import psutil

from app.client import parse_sse

TERMINAL = ("succeeded", "failed", "cancelled")
RANK = {"queued": 0, "running": 1, "succeeded": 2, "failed": 2, "cancelled": 2}


def wait_verification(http: httpx.Client, job_id: str, verification_id: str) -> dict:
    deadline = time.monotonic() + 180
    while True:
        v = http.get(f"/jobs/{job_id}/verifications/{verification_id}").json()
        if v["status"] in TERMINAL or time.monotonic() > deadline:
            return v
        time.sleep(0.1)


def verify_stored(http: httpx.Client, job: dict) -> dict:
    """A verification of the job's stored checkpoint (4 windows, one prompt): it succeeds with
    the perplexity the job reported after quantizing; returns its result."""
    r = http.post(f"/jobs/{job['id']}/verifications",
                  json={"max_windows": 4, "prompts": ["Return the"], "max_new_tokens": 6})
    assert r.status_code == 202, r.text
    assert r.json()["progress"] is None  # queued
    v = wait_verification(http, job["id"], r.json()["id"])
    assert v["status"] == "succeeded", v
    assert v["progress"]["stage"] == "done" and v["progress"]["fraction"] == 1.0, v
    reported = job["metrics"]["perplexity_after"]
    assert abs(v["result"]["perplexity"] - reported) <= 1e-3 * reported
    return {**v["result"], "id": v["id"]}


def read_events(url: str, job_id: str, last_event_id: int | None = None,
                limit: int | None = None) -> list[dict]:
    """Events from one connection: all of them until the stream ends, or the first `limit`
    (then the connection is dropped, as a client that goes away would)."""
    headers = {"Last-Event-ID": str(last_event_id)} if last_event_id is not None else {}
    out = []
    with httpx.stream("GET", f"{url}/jobs/{job_id}/events", headers=headers,
                      timeout=httpx.Timeout(10, read=120)) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for ev in parse_sse(r.iter_lines()):
            data = json.loads(ev["data"])
            assert int(ev["id"]) == data["seq"]
            assert ev.get("event") == data["type"]
            out.append(data)
            if limit is not None and len(out) >= limit:
                break
    return out


def read_events_resuming(url: str, job_id: str, chunk: int) -> list[dict]:
    """The whole log, reconnecting with Last-Event-ID after every `chunk` events."""
    events: list[dict] = []
    while True:
        last = events[-1]["seq"] if events else None
        got = read_events(url, job_id, last, limit=chunk)
        events += got
        if not got or (got[-1]["type"] == "status" and got[-1]["status"] in TERMINAL):
            return events


class Poller(threading.Thread):
    """Polls GET /jobs/{id} until the job ends, keeping every (status, fraction, block) seen."""

    def __init__(self, url: str, job_id: str) -> None:
        super().__init__(daemon=True)
        self.url, self.job_id, self.seen = url, job_id, []

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as http:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                job = http.get(f"/jobs/{self.job_id}").json()
                self.seen.append((job["status"], job["progress"]["fraction"],
                                  job["progress"]["block"]))
                if job["status"] in TERMINAL:
                    return
                time.sleep(0.05)


def check_events(events: list[dict], num_blocks: int, final: str) -> None:
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1)), "gap or repeat"
    statuses = [e["status"] for e in events if e["type"] == "status"]
    assert statuses == ["queued", "running", final], statuses
    progress = [e for e in events if e["type"] == "progress"]
    fractions = [e["fraction"] for e in progress]
    assert fractions == sorted(fractions), "progress went backwards"
    assert all(0.0 <= f <= 1.0 for f in fractions)
    if final == "succeeded":
        assert fractions[-1] == 1.0
        blocks = [e["block"] for e in progress if e["stage"] == "quantizing" and e["block"]]
        assert sorted(set(blocks)) == list(range(1, num_blocks + 1)), blocks
        assert blocks == sorted(blocks), "blocks out of order"
        assert all(e["num_blocks"] == num_blocks for e in progress if e["block"])
        assert {e["stage"] for e in progress} >= {"loading", "calibration", "quantizing", "saving"}


def download_all(http: httpx.Client, job_id: str, dest: Path) -> list[dict]:
    """Downloads every listed artifact into dest; asserts each matches its listed sha256."""
    listing = http.get(f"/jobs/{job_id}/artifacts").json()
    assert {a["name"] for a in listing} >= {"config.json", "model.safetensors",
                                            "quantize_config.json"}
    for art in listing:
        r = http.get(f"/jobs/{job_id}/artifacts/{art['name']}")
        assert r.status_code == 200
        assert len(r.content) == art["size"]
        assert hashlib.sha256(r.content).hexdigest() == art["sha256"], art["name"]
        (dest / art["name"]).parent.mkdir(parents=True, exist_ok=True)
        (dest / art["name"]).write_bytes(r.content)
    return listing


def check_range_and_archive(http: httpx.Client, job_id: str, listing: list[dict],
                            dest: Path) -> None:
    weights = (dest / "model.safetensors").read_bytes()
    r = http.get(f"/jobs/{job_id}/artifacts/model.safetensors", headers={"Range": "bytes=8-99"})
    assert r.status_code == 206
    assert r.content == weights[8:100]
    assert r.headers["content-range"] == f"bytes 8-99/{len(weights)}"
    r = http.get(f"/jobs/{job_id}/archive")
    assert r.status_code == 200
    assert int(r.headers["content-length"]) == len(r.content)
    with tarfile.open(fileobj=io.BytesIO(r.content)) as tar:
        names = sorted(m.name for m in tar.getmembers())
        assert names == sorted(f"{job_id}/{a['name']}" for a in listing)
        for art in listing:
            data = tar.extractfile(f"{job_id}/{art['name']}").read()
            assert hashlib.sha256(data).hexdigest() == art["sha256"]


def loader_perplexity(checkpoint: Path, source: str, seq_length: int, max_windows: int) -> float:
    """Perplexity of a downloaded checkpoint read by the engine's loader, on the job's eval
    text with the job's evaluation settings."""
    from worker.gptq.evaluate import load_texts, perplexity
    from worker.gptq.loader import load_quantized

    model, tokenizer = load_quantized(checkpoint)
    return perplexity(model, tokenizer, load_texts(source), seq_length, max_windows)


def run_full_job(url: str, spec: dict, dest: Path, num_blocks: int) -> dict:
    """Submit → queued → running → succeeded, watched both by polling and by a resuming event
    stream; then downloads and checks every artifact and the reported perplexity."""
    http = httpx.Client(base_url=url, timeout=30)
    r = http.post("/jobs", json=spec)
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == f"/jobs/{job['id']}"
    assert job["status"] == "queued" and job["attempts"] == 0
    poller = Poller(url, job["id"])
    poller.start()
    events = read_events_resuming(url, job["id"], chunk=4)
    poller.join(timeout=300)

    check_events(events, num_blocks, "succeeded")
    assert read_events(url, job["id"]) == events  # a fresh replay is the same log
    ranks = [RANK[s] for s, _, _ in poller.seen]
    assert ranks == sorted(ranks), f"status went backwards: {poller.seen}"
    fractions = [f for _, f, _ in poller.seen]
    assert fractions == sorted(fractions), "polled progress went backwards"

    job = http.get(f"/jobs/{job['id']}").json()
    assert job["status"] == "succeeded", job["error"]
    assert job["attempts"] == 1 and job["error"] is None
    assert job["created_at"] <= job["started_at"] <= job["finished_at"]
    assert job["progress"]["fraction"] == 1.0
    metrics = job["metrics"]
    assert metrics["num_blocks"] == num_blocks
    assert metrics["loss_summary"]["modules"] == 7 * num_blocks
    assert metrics["sizes"]["checkpoint_bytes"] < metrics["sizes"]["original_bytes"]

    dest.mkdir(parents=True, exist_ok=True)
    listing = download_all(http, job["id"], dest)
    assert job["artifacts"] == listing
    check_range_and_archive(http, job["id"], listing, dest)
    evaluation = metrics["evaluation"]
    if spec["calibration"].get("dataset") == "builtin":  # scored on text it never calibrated on
        assert (evaluation["source"], evaluation["held_out"]) == ("builtin-heldout", True)
    ppl = loader_perplexity(dest, evaluation["source"], evaluation["seq_length"],
                            spec["verify"]["max_windows"])
    assert abs(ppl - metrics["perplexity_after"]) <= 1e-3 * metrics["perplexity_after"], (
        ppl, metrics["perplexity_after"])
    return job


def raw_status(url: str, method: str, path: str, headers: list[bytes], body: bytes = b"") -> int:
    """The status of a request sent byte for byte over a socket: an HTTP client library
    refuses or trims header values (control characters, blanks around) that a forger sends."""
    host, port = url.removeprefix("http://").split(":")
    head = [f"{method} {path} HTTP/1.1".encode(), b"Host: " + host.encode(),
            b"Connection: close", f"Content-Length: {len(body)}".encode(), *headers]
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(b"\r\n".join(head) + b"\r\n\r\n" + body)
        status_line = conn.makefile("rb").readline()
    return int(status_line.split()[1])


def job_processes(worker: subprocess.Popen) -> list[psutil.Process]:
    """The job processes (python -m worker.jobprocess) under a worker, waiting or running."""
    out = []
    for child in psutil.Process(worker.pid).children(recursive=True):
        try:
            if "worker.jobprocess" in child.cmdline():
                out.append(child)
        except psutil.NoSuchProcess:
            pass
    return out


def wait_for(what: str, check: object, timeout: float = 60) -> object:
    deadline = time.monotonic() + timeout
    while not (got := check()):  # type: ignore[operator]
        assert time.monotonic() < deadline, f"{what}: not after {timeout:.0f} s"
        time.sleep(0.1)
    return got


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """GET /metrics: every sample by (name, sorted labels)."""
    from prometheus_client.parser import text_string_to_metric_families

    with httpx.Client(base_url=url, timeout=30) as http:
        r = http.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }
