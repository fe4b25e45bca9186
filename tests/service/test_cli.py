"""`gptqd submit --wait`, `gptqd jobs` and `gptqd download` against a running box."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.service.conftest import Box

pytestmark = pytest.mark.service


def gptqd(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app.cli", *args], cwd=ROOT,
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


def test_submit_with_a_bad_field_names_it(team_box: Box) -> None:
    run = gptqd("submit", "tiny", "--bits", "5", "--url", team_box.url)
    assert run.returncode == 1
    assert "bits" in run.stderr and "HTTP 422" in run.stderr
