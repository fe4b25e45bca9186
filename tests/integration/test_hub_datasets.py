"""Calibration and evaluation text from a hub dataset, fetched from a hub (tests/fakehub.py,
a real HTTP server on loopback serving a repository shaped like Salesforce/wikitext): by its
id, and by the old name the hub redirects to it ("wikitext"), which datasets 5 refuses on its
own; both runs read the same rows, so their checkpoints are the same."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import fixture_path
from tests.fakehub import fake_hub, wikitext_repo
from tests.integration.checkpoints import assert_same_checkpoint

pytestmark = pytest.mark.fixtures
CHILD = textwrap.dedent("""
    import json, sys
    from worker.gptq.api import quantize
    from worker.gptq.config import CalibrationSpec, QuantizeConfig
    from worker.gptq.evaluate import EvalSpec

    model, out, name = sys.argv[1:4]
    report = quantize(model, out, QuantizeConfig(bits=4, group_size=32),
                      CalibrationSpec(f"{name}:wikitext-2-raw-v1:train", num_samples=8,
                                      seq_length=64),
                      device="cpu", evaluate=EvalSpec(f"{name}:wikitext-2-raw-v1:test",
                                                      seq_length=64, max_windows=4, prompts=()))
    print(json.dumps({"before": report.perplexity_before, "after": report.perplexity_after}))
""")


def _quantize(hub_url: str, home: Path, out: Path, name: str) -> dict:
    env = {**os.environ, "HF_ENDPOINT": hub_url, "HF_HOME": str(home), "HF_HUB_OFFLINE": "0",
           "HF_DATASETS_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1",
           "HF_HUB_CACHE": str(home / "hub"), "HF_DATASETS_CACHE": str(home / "datasets")}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(fixture_path("models", "tiny-gpt2-wikitext2")),
         str(out), name], capture_output=True, text=True, timeout=300,
        cwd=Path(__file__).parents[2], env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_hub_dataset_by_its_id_or_its_old_name_calibrates_and_scores(tmp_path: Path) -> None:
    repo = wikitext_repo(tmp_path / "wikitext")
    with fake_hub({}, datasets={"Salesforce/wikitext": repo},
                  aliases={"wikitext": "Salesforce/wikitext"}) as hub:
        by_id = _quantize(hub.url, tmp_path / "home1", tmp_path / "by-id", "Salesforce/wikitext")
        by_name = _quantize(hub.url, tmp_path / "home2", tmp_path / "by-name", "wikitext")
        fetched = hub.downloads(".parquet")
    # both runs fetched the two splits, each into its own empty cache
    assert sorted(fetched) == sorted(2 * ["wikitext-2-raw-v1/train-00000-of-00001.parquet",
                                          "wikitext-2-raw-v1/test-00000-of-00001.parquet"])
    assert by_id == by_name and 1 < by_id["before"] < by_id["after"] < 1.2 * by_id["before"]
    assert_same_checkpoint(tmp_path / "by-id", tmp_path / "by-name")
