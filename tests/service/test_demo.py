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


def _run_demo(tmp_path: Path, extra_env: dict[str, str]) -> str:
    """Runs the demo on a fresh data dir, checks what every run must print; its stdout."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("GPTQD_") or k == "GPTQD_FIXTURES"}
    env.update({"GPTQD_DATA_DIR": str(tmp_path / "var"), **extra_env})
    proc = subprocess.run([sys.executable, "-m", "app.demo"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    assert re.search(r"job job_\w+: succeeded", out)
    assert re.search(r"perplexity: [\d.]+ before, [\d.]+ after quantization", out)
    top1, kl = re.search(r"agreement with the original: top-1 token ([\d.]+)%, KL ([\d.]+) nats per token",
                         out).groups()
    assert 50 < float(top1) < 100 and 0 < float(kl) < 1, (top1, kl)
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
    ours = ("[demo] ", "job ", "perplexity: ", "agreement with the original: ", "size: ", "sample: ",
            "artifacts: ")
    assert [line for line in out.splitlines() if not line.startswith(ours)] == [], out
    progress = re.compile(r"^\w+ +\d+%  ")  # the job's progress, one line per event
    assert [line for line in proc.stderr.splitlines() if not progress.match(line)] == [], proc.stderr
    return out


def test_demo_runs_a_job_to_a_verified_checkpoint(tmp_path: Path) -> None:
    out = _run_demo(tmp_path, {})
    assert "[demo] no model hub here: building a small Llama" in out
    assert "held out from calibration" in out


@pytest.mark.fixtures
def test_demo_where_the_hub_answers_quantizes_its_model_on_wikitext(tmp_path: Path) -> None:
    """A machine that reaches the hub (here tests/fakehub.py, a real HTTP server serving the
    fixtures' small GPT-2 as openai-community/gpt2 and the fixtures' wikitext-2 shaped as
    Salesforce/wikitext): the demo's model and calibration text come from it, on the job
    spec's defaults, and the perplexity is measured on the dataset's test split."""
    from tests.conftest import fixture_path
    from tests.fakehub import fake_hub, wikitext_repo

    gpt2 = fixture_path("models", "tiny-gpt2-wikitext2")
    with fake_hub({"openai-community/gpt2": gpt2},
                  datasets={"Salesforce/wikitext": wikitext_repo(tmp_path / "wikitext")},
                  aliases={"wikitext": "Salesforce/wikitext"}) as hub:
        home = tmp_path / "hf"  # empty caches: everything comes from the hub
        out = _run_demo(tmp_path, {"HF_ENDPOINT": hub.url, "HF_HOME": str(home),
                                   "HF_HUB_CACHE": str(home / "hub"),
                                   "HF_DATASETS_CACHE": str(home / "datasets"),
                                   "HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0"})
        fetched = hub.downloads()
    assert "[demo] the model hub answers: quantizing openai-community/gpt2 on wikitext-2" in out
    assert "model.safetensors" in fetched
    assert "wikitext-2-raw-v1/train-00000-of-00001.parquet" in fetched
    assert "wikitext-2-raw-v1/test-00000-of-00001.parquet" in fetched
    assert "on Salesforce/wikitext:wikitext-2-raw-v1:test, held out from calibration" in out, out
