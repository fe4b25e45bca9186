"""The README's main-job command on a fresh data dir: `python -m app.demo`."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.service


def test_demo_runs_a_job_to_a_verified_checkpoint(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("GPTQD_") or k == "GPTQD_FIXTURES"}
    env["GPTQD_DATA_DIR"] = str(tmp_path / "var")
    proc = subprocess.run([sys.executable, "-m", "app.demo"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    assert re.search(r"job job_\w+: succeeded", out)
    assert re.search(r"perplexity: [\d.]+ before, [\d.]+ after quantization", out)
    assert "[demo] verification: perplexity" in out
    assert "[demo] generated: 'Once upon a time" in out
    checkpoint = Path(re.search(r"\[demo\] checkpoint: (\S+)", out).group(1))
    assert checkpoint.parent == tmp_path / "var" / "artifacts"
    assert {"config.json", "model.safetensors", "quantize_config.json"} <= {
        p.name for p in checkpoint.iterdir()}
    # what to do with the checkpoint once the box has stopped, not a URL that no longer answers
    assert f"[demo] score it on a text: gptqd eval --model {checkpoint} --text" in out
    assert "http://" not in out.split("[demo] checkpoint:")[1]
    # nothing but the demo's own lines (third-party banners, warnings and progress bars from
    # importing and saving models stay out; the box's processes log in full to their files)
    ours = ("[demo] ", "job ", "perplexity: ", "size: ", "sample: ", "artifacts: ")
    assert [line for line in out.splitlines() if not line.startswith(ours)] == [], out
    progress = re.compile(r"^\w+ +\d+%  ")  # the job's progress, one line per event
    assert [line for line in proc.stderr.splitlines() if not progress.match(line)] == [], proc.stderr
