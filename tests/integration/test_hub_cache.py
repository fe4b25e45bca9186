"""A hub model id is streamed block by block too: its safetensors files are fetched into the
hub cache (only those its index names) and read from there. Here the hub is a cache made by
hand and the process is offline (HF_HUB_OFFLINE), as a box without internet would be."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers as tf

from tests.integration.checkpoints import assert_same_checkpoint, tiny_llama
from worker.gptq.api import quantize
from worker.gptq.config import CalibrationSpec, QuantizeConfig

COMMIT = "0123456789abcdef0123456789abcdef01234567"
CHILD = textwrap.dedent("""
    import json, sys
    from worker.gptq.api import quantize
    from worker.gptq.config import CalibrationSpec, QuantizeConfig

    report = quantize(sys.argv[1], sys.argv[2], QuantizeConfig(bits=4, group_size=32),
                      CalibrationSpec("builtin", num_samples=8, seq_length=64), device="cpu")
    print(json.dumps({"lazy": report.lazy, "modules": len(report.modules)}))
""")


def cached_repo(hub: Path, repo_id: str, files: Path) -> Path:
    """The hub cache's layout for repo_id at COMMIT, refs/main pointing to it."""
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    shutil.copytree(files, repo / "snapshots" / COMMIT)
    return repo / "snapshots" / COMMIT


def _quantize_offline(repo_id: str, hub: Path, out: Path) -> dict:
    env = {**os.environ, "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", CHILD, repo_id, str(out)], capture_output=True,
                          text=True, timeout=300, cwd=Path(__file__).parents[2], env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("llama") / "model", layers=2)


def test_a_hub_model_with_safetensors_is_streamed_from_the_cache(source: Path, tmp_path: Path) -> None:
    files = tmp_path / "files"
    shutil.copytree(source, files)
    model = tf.AutoModelForCausalLM.from_pretrained(files)
    for f in files.glob("*.safetensors"):
        f.unlink()
    model.save_pretrained(files, max_shard_size="100KB")  # shards named by an index
    # a second copy of the weights under another name, as some repos ship: the index says
    # what is read (that it is not even fetched: tests/unit/test_modelio.py)
    shutil.copy(next(files.glob("model-0*.safetensors")), files / "consolidated.safetensors")
    snapshot = cached_repo(tmp_path / "hub", "org/tiny", files)

    local = quantize(str(source), tmp_path / "local", QuantizeConfig(bits=4, group_size=32),
                     CalibrationSpec("builtin", num_samples=8, seq_length=64), device="cpu")
    hub = _quantize_offline("org/tiny", tmp_path / "hub", tmp_path / "from-hub")
    assert hub == {"lazy": True, "modules": len(local.modules)}
    assert assert_same_checkpoint(tmp_path / "local", tmp_path / "from-hub") > 10
    assert (snapshot / "model.safetensors.index.json").is_file()


def test_a_hub_model_without_safetensors_is_loaded_whole(source: Path, tmp_path: Path) -> None:
    files = tmp_path / "files"
    shutil.copytree(source, files)
    for f in files.glob("*.safetensors"):
        f.unlink()
    model = tf.AutoModelForCausalLM.from_pretrained(source)
    torch.save(model.state_dict(), files / "pytorch_model.bin")
    cached_repo(tmp_path / "hub", "org/tiny-bin", files)
    assert _quantize_offline("org/tiny-bin", tmp_path / "hub", tmp_path / "out")["lazy"] is False
    assert (tmp_path / "out" / "model.safetensors").is_file()
