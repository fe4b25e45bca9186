"""The job service end to end, with real processes: uvicorn, Celery workers, Redis, PostgreSQL."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from app.client import parse_sse
from tests.service.conftest import DEEP, NO_VERIFY, TERMINAL, TINY, Box, tiny_spec, wait_status
from tests.service.helpers import check_events, read_events, run_full_job, verify_stored

pytestmark = pytest.mark.service


def test_job_runs_to_a_verified_checkpoint(team_box: Box, tmp_path: Path) -> None:
    job = run_full_job(team_box.url, tiny_spec(name="lifecycle"), tmp_path / "ckpt", TINY.layers)
    http = team_box.http
    # the checkpoint on the server is complete and nothing partial is left behind
    assert (team_box.data_dir / "artifacts" / job["id"] / "model.safetensors").is_file()
    assert not (team_box.data_dir / "artifacts" / f"{job['id']}.partial").exists()

    # a verification runs on a worker against the stored checkpoint
    result = verify_stored(http, job)
    assert (result["eval_source"], result["held_out"]) == ("builtin-heldout", True)
    assert result["samples"][0]["prompt"] == "Return the"
    assert result["samples"][0]["text"].startswith("Return the")
    assert len(result["samples"][0]["text"]) > len("Return the")
    page = http.get(f"/jobs/{job['id']}/verifications").json()  # one shape for every list
    assert [x["id"] for x in page["items"]] == [result["id"]] and page["next_cursor"] is None

    # listing: newest first, filtered, paginated with a cursor
    page = http.get("/jobs", params={"status": "succeeded", "limit": 1}).json()
    assert page["items"][0]["id"] == job["id"]
    assert all(j["status"] == "succeeded" for j in page["items"])

    # delete removes the job and its files
    assert http.delete(f"/jobs/{job['id']}").status_code == 204
    assert http.get(f"/jobs/{job['id']}").status_code == 404
    assert not (team_box.data_dir / "artifacts" / job["id"]).exists()


def test_idempotency_key_returns_the_same_job(team_box: Box) -> None:
    http = team_box.http
    spec = tiny_spec(name="idem", verify=NO_VERIFY)
    first = http.post("/jobs", json=spec, headers={"Idempotency-Key": "idem-1"})
    again = http.post("/jobs", json=spec, headers={"Idempotency-Key": "idem-1"})
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"
    other = http.post("/jobs", json=tiny_spec(name="other", verify=NO_VERIFY), headers={"Idempotency-Key": "idem-1"})
    assert other.status_code == 422
    assert "Idempotency-Key" in other.json()["detail"]
    wait_status(http, first.json()["id"], TERMINAL)


def test_one_worker_runs_jobs_one_after_another_and_a_cancelled_queued_job_never_starts(
    team_box: Box,
) -> None:
    http = team_box.http
    a = http.post("/jobs", json=tiny_spec(name="seq-a", verify=NO_VERIFY)).json()
    b = http.post("/jobs", json=tiny_spec(name="seq-b", verify=NO_VERIFY)).json()
    c = http.post("/jobs", json=tiny_spec(name="seq-c", verify=NO_VERIFY)).json()
    r = http.post(f"/jobs/{c['id']}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    a, b = (wait_status(http, j["id"], TERMINAL) for j in (a, b))
    assert a["status"] == b["status"] == "succeeded"
    first, second = sorted((a, b), key=lambda j: j["started_at"])
    assert first["finished_at"] <= second["started_at"], "one worker ran two jobs at once"
    # c's message reached the worker too (after b); the store said cancelled, so it was skipped
    c = http.get(f"/jobs/{c['id']}").json()
    assert c["status"] == "cancelled" and c["attempts"] == 0 and c["started_at"] is None
    assert [e["status"] for e in read_events(team_box.url, c["id"]) if e["type"] == "status"] == [
        "queued", "cancelled"]
    assert http.get(f"/jobs/{c['id']}/artifacts").status_code == 409
    assert http.post(f"/jobs/{c['id']}/cancel").status_code == 409


def test_cancel_a_running_job_stops_it_at_a_module_boundary(team_box: Box) -> None:
    http = team_box.http
    spec = tiny_spec(model_id="tiny-deep", name="cancel-running", verify=NO_VERIFY,
                     calibration={"dataset": "builtin", "num_samples": 32, "seq_length": 128})
    job = http.post("/jobs", json=spec).json()
    # cancel as soon as the engine reports its first quantized module
    with httpx.stream("GET", f"{team_box.url}/jobs/{job['id']}/events",
                      timeout=httpx.Timeout(10, read=120)) as r:
        for ev in parse_sse(r.iter_lines()):
            if json.loads(ev["data"]).get("module"):
                break
    r = http.post(f"/jobs/{job['id']}/cancel")
    assert r.status_code == 202 and r.json()["cancel_requested"]
    job = wait_status(http, job["id"], TERMINAL)
    assert job["status"] == "cancelled"
    assert job["progress"]["fraction"] < 1.0
    assert job["artifacts"] == []
    assert http.get(f"/jobs/{job['id']}/artifacts").status_code == 409
    events = read_events(team_box.url, job["id"])
    check_events(events, DEEP.layers, "cancelled")
    types = [e["type"] for e in events]
    assert types.index("cancel_requested") < len(types) - 1
    # layers that share one input (q/k/v, gate/up) are solved as one stacked problem: the
    # boundary a cancel waits for is the end of that set, so its other layers may still report
    after = {(e["block"], e["module"].rsplit(".", 1)[-1])
             for e in events[types.index("cancel_requested"):] if e.get("module")}
    sets = [{"q_proj", "k_proj", "v_proj"}, {"o_proj"}, {"gate_proj", "up_proj"}, {"down_proj"}]
    assert len({block for block, _ in after}) <= 1, after
    assert any({name for _, name in after} <= s for s in sets), \
        f"the job went on past the next module boundary: {after}"
    for suffix in ("", ".partial"):
        assert not (team_box.data_dir / "artifacts" / f"{job['id']}{suffix}").exists()


def test_two_workers_run_two_jobs_at_once(team_box: Box, tmp_path: Path) -> None:
    http = team_box.http
    # the second job calibrates on an uploaded dataset
    from worker.gptq.calibration import builtin_rows

    text = "\n\n".join(builtin_rows()[:400])
    r = http.post("/datasets", files={"file": ("calib.txt", text.encode())})
    assert r.status_code == 201, r.text
    dataset = r.json()
    assert dataset["id"] in [d["id"] for d in http.get("/datasets").json()["items"]]

    extra = team_box.add_worker("w2")
    try:
        a = http.post("/jobs", json=tiny_spec(name="par-a", verify=NO_VERIFY)).json()
        b = http.post("/jobs", json=tiny_spec(name="par-b", verify=NO_VERIFY, calibration={
            "dataset_id": dataset["id"], "num_samples": 8, "seq_length": 64})).json()
        a, b = (wait_status(http, j["id"], TERMINAL) for j in (a, b))
    finally:
        team_box.remove_worker(extra)
    assert a["status"] == b["status"] == "succeeded", (a["error"], b["error"])
    assert a["started_at"] < b["finished_at"] and b["started_at"] < a["finished_at"], (
        "the two jobs did not overlap")
    assert b["metrics"]["calibration"]["source"] == f"{dataset['id']}.txt"


def test_bad_requests_name_the_field(team_box: Box) -> None:
    http = team_box.http
    cases = [
        ({"model_id": "tiny", "bits": 5}, ["body", "bits"]),
        ({"model_id": "../etc"}, ["body", "model_id"]),
        ({"model_id": "tiny", "surprise": 1}, ["body", "surprise"]),
        ({"model_id": "tiny", "calibration": {"dataset_id": "ds_" + "0" * 32}},
         ["body", "calibration", "dataset_id"]),
        ({"model_id": "tiny", "trust_remote_code": True}, ["body", "trust_remote_code"]),
    ]
    for body, loc in cases:
        r = http.post("/jobs", json=body)
        assert r.status_code == 422, (body, r.text)
        assert loc in [d["loc"] for d in r.json()["detail"]], (body, r.json())
    assert http.get("/jobs/job_nope").status_code == 404
    r = http.get("/jobs", params={"cursor": "not-a-cursor"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "cursor"]
    r = http.post("/datasets", files={"file": ("x.exe", b"MZ")})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "file"]
    assert http.get("/healthz").json() == {"status": "ok"}
    ready = http.get("/readyz").json()
    assert ready["checks"] == {"store": "ok", "broker": "ok"}


def test_a_mistyped_local_model_fails_in_seconds_naming_the_local_models(team_box: Box) -> None:
    """This box's worker is not told HF_HUB_OFFLINE: it finds the unreachable hub with one
    short probe (about 25 s of huggingface_hub's retries before) and says what is local."""
    http = team_box.http
    job = http.post("/jobs", json=tiny_spec(model_id="tinyy", verify=NO_VERIFY)).json()
    job = wait_status(http, job["id"], TERMINAL)
    assert job["status"] == "failed" and job["error"]["code"] == "model_not_found"
    message = job["error"]["message"]
    hub_said = ("could not be reached", "not found on the hub")  # no network, or a hub's 404
    assert any(words in message for words in hub_said), message
    for words in ("'tinyy'", "did you mean 'tiny'", "GPTQD_MODELS_DIR"):
        assert words in message, message
    ran = datetime.fromisoformat(job["finished_at"]) - datetime.fromisoformat(job["started_at"])
    assert ran.total_seconds() < 15, ran
