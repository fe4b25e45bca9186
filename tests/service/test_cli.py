"""The client commands (`gptqd submit --wait`, `jobs`, `download`, `verify`, `verifications`,
`upload`, `datasets`, `cancel`) against a running box, and against no server at all."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from app.box import free_port
from app.client import Client, Unreachable
from tests.conftest import ROOT
from tests.service.conftest import NO_VERIFY, TERMINAL, Box, tiny_spec, wait_status

pytestmark = pytest.mark.service


def gptqd(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}  # help on one line per option
    return subprocess.run([sys.executable, "-m", "app.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_submit_wait_then_list_and_download(team_box: Box, tmp_path: Path) -> None:
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"verify": {"max_windows": 2, "max_new_tokens": 4}}))
    run = gptqd("submit", "tiny", "--spec", str(spec), "--group-size", "32", "--dataset",
                "builtin", "--num-samples", "8", "--seq-length", "64", "--name", "cli",
                "--wait", "--url", team_box.url)
    assert run.returncode == 0, run.stdout + run.stderr
    job_id = re.search(r"job (job_\w+): succeeded", run.stdout).group(1)
    assert re.search(r"perplexity: [\d.]+ before, [\d.]+ after", run.stdout)
    assert "block 2/2" in run.stderr  # the live progress bar went through the blocks
    job = team_box.http.get(f"/jobs/{job_id}").json()
    assert job["spec"]["group_size"] == 32 and job["spec"]["verify"]["max_windows"] == 2

    listed = gptqd("jobs", "--url", team_box.url, "--status", "succeeded")
    assert listed.returncode == 0 and job_id in listed.stdout

    out = tmp_path / "ckpt"
    got = gptqd("download", job_id, "--out", str(out), "--url", team_box.url)
    assert got.returncode == 0, got.stderr
    for art in job["artifacts"]:
        assert hashlib.sha256((out / art["name"]).read_bytes()).hexdigest() == art["sha256"]

    verified = gptqd("verify", job_id, "--max-windows", "2", "--prompt", "Once upon",
                     "--max-new-tokens", "3", "--wait", "--url", team_box.url)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    vid = re.search(r"verification (ver_\w+): succeeded", verified.stdout).group(1)
    ppl = re.search(r"perplexity: ([\d.]+) on \S+ \(2 windows", verified.stdout).group(1)
    assert "sample: 'Once upon" in verified.stdout
    listed = gptqd("verifications", job_id, "--url", team_box.url)
    assert listed.returncode == 0, listed.stderr
    assert re.search(rf"{vid}\s+succeeded\s+.*\s{ppl}$", listed.stdout, re.M), listed.stdout


def test_submit_with_a_bad_field_names_it(team_box: Box) -> None:
    run = gptqd("submit", "tiny", "--bits", "5", "--url", team_box.url)
    assert run.returncode == 1
    assert "bits" in run.stderr and "HTTP 422" in run.stderr


def test_every_client_command_without_a_server_says_how_to_start_one(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    text = tmp_path / "calib.txt"
    text.write_text("some text\n")
    for args in (["submit", "tiny"], ["jobs"], ["download", "job_x"], ["verify", "job_x"],
                 ["verifications", "job_x"], ["upload", str(text)], ["datasets"],
                 ["cancel", "job_x"]):
        run = gptqd(*args, "--url", url)
        assert run.returncode == 1, (args, run.stderr)
        assert run.stderr.strip().splitlines() == [
            f"error: no gptqd server answers at {url}: start one with `gptqd up`, "
            "or point --url (or GPTQD_URL) at a running one"], (args, run.stderr)


def test_following_a_job_gives_up_once_the_server_has_gone() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    events = Client(url).events("job_x", give_up_after=1.0)
    with pytest.raises(Unreachable, match=f"no gptqd server answers at {url}"):
        next(events)


def test_help_shows_flags_as_flags_and_the_server_defaults() -> None:
    run = gptqd("submit", "--help")
    assert run.returncode == 0, run.stderr
    options = {line.split()[1]: line for line in run.stdout.splitlines()
               if line.startswith("│ --")}
    for flag in ("--desc-act", "--sym", "--static-groups", "--true-sequential", "--wait"):
        assert "<bool>" not in options[flag], options[flag]
    assert "--no-desc-act" in options["--desc-act"]
    assert "(server default: 4)" in options["--bits"]
    assert "(server default: 128)" in options["--group-size"]
    assert "(server default: off)" in options["--desc-act"]
    assert "(server default: 512)" in options["--seq-length"]


def test_a_flag_not_given_leaves_the_server_default(team_box: Box, tmp_path: Path) -> None:
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps({r"+:.*\.mlp\.down_proj": {"bits": 8}}))
    run = gptqd("submit", "tiny", "--no-sym", "--dataset", "builtin", "--num-samples", "8",
                "--seq-length", "64", "--dynamic", f"@{rules}", "--url", team_box.url)
    assert run.returncode == 0, run.stderr
    job = wait_status(team_box.http, run.stdout.strip(), TERMINAL)
    assert job["spec"]["sym"] is False and job["spec"]["desc_act"] is False
    assert job["spec"]["group_size"] == 128
    assert job["spec"]["dynamic"] == {r"+:.*\.mlp\.down_proj": {"bits": 8}}


def test_jobs_lists_a_header_names_ages_and_why_a_job_failed(team_box: Box) -> None:
    http = team_box.http
    job = http.post("/jobs", json=tiny_spec(model_id="no-such-model", name="doomed",
                                            verify=NO_VERIFY)).json()
    assert wait_status(http, job["id"], TERMINAL)["status"] == "failed"
    run = gptqd("jobs", "--url", team_box.url, "--status", "failed")
    assert run.returncode == 0, run.stderr
    header, *rows = run.stdout.splitlines()
    assert header.split() == ["JOB", "NAME", "STATUS", "PROGRESS", "CREATED", "MODEL", "ERROR"]
    row = next(r for r in rows if r.startswith(job["id"]))
    assert re.search(r"\bdoomed\s+failed\s+\d+%\s+(just now|\d+ min ago)\s+no-such-model\s+"
                     r"model_not_found: \S", row), row


def test_upload_a_calibration_file_and_list_it(team_box: Box, tmp_path: Path) -> None:
    text = tmp_path / "calib.txt"
    text.write_text("A calibration text of a few words.\n" * 50)
    run = gptqd("upload", str(text), "--url", team_box.url)
    assert run.returncode == 0, run.stderr
    ds_id = run.stdout.strip()
    assert re.fullmatch(r"ds_[0-9a-f]{32}", ds_id), run.stdout
    listed = gptqd("datasets", "--url", team_box.url)
    assert re.search(rf"^{ds_id}\s+txt\s+{text.stat().st_size}\s+.*calib.txt$", listed.stdout,
                     re.M), listed.stdout


def test_cancel_a_queued_job(team_box: Box) -> None:
    http = team_box.http
    spec = tiny_spec(model_id="tiny-deep", verify=NO_VERIFY,
                     calibration={"dataset": "builtin", "num_samples": 32, "seq_length": 128})
    blocker = http.post("/jobs", json=spec).json()  # keeps the one worker busy
    victim = http.post("/jobs", json=tiny_spec(name="victim", verify=NO_VERIFY)).json()
    run = gptqd("cancel", victim["id"], "--url", team_box.url)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == f"job {victim['id']}: cancelled"
    again = gptqd("cancel", victim["id"], "--url", team_box.url)
    assert again.returncode == 1 and "already ended (cancelled)" in again.stderr
    wait_status(http, blocker["id"], TERMINAL)
