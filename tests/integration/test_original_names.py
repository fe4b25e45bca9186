"""`gptqd original-names` (worker/gptq/tensornames.py): a GPTQ Mixtral copied with the tensor
names Mixtral's own checkpoints use, the names transformers itself saves and vLLM's Mixtral
reads (`block_sparse_moe.experts.E.w1/w3/w2`, `block_sparse_moe.gate`), while gptqd and
GPTQModel write the in-memory module names. Checked against transformers' save_pretrained of
the same tiny models; our loaders read either naming to the same numbers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from app.commands.engine import _perplexity
from tests.integration.checkpoints import assert_same_checkpoint, saved_tiny_model
from tests.integration.test_families import (  # noqa: F401  (fixtures)
    gptqmodel_restoring,
    quantized_checkpoint,
    tokenizer,
    windows,
)
from tests.integration.test_interop import our_reading, require
from tests.tiny_models import tiny_model
from worker.gptq.api import quantize
from worker.gptq.config import CalibrationSpec, QuantizeConfig
from worker.gptq.errors import EngineError
from worker.gptq.lazyload import INDEX_FILE
from worker.gptq.tensornames import write_with_original_names

pytestmark = pytest.mark.fixtures  # the babyllama tokenizer

QUANTIZED_PARTS = (".qweight", ".qzeros", ".scales", ".g_idx")


def checkpoint_names(path: Path) -> set[str]:
    names = set()
    for file in path.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            names.update(f.keys())
    return names


def as_unquantized(names: set[str]) -> set[str]:
    """The names an unquantized checkpoint of the same model has: a layer's .weight for its
    GPTQ tensors."""
    return ({n.removesuffix(".qweight") + ".weight" for n in names if n.endswith(".qweight")}
            | {n for n in names if not n.endswith(QUANTIZED_PARTS)})


def saved_by_transformers(model_type: str, path: Path) -> set[str]:
    tiny_model(model_type).save_pretrained(path)
    return checkpoint_names(path)


@pytest.fixture(scope="module")
def mixtral(windows, tokenizer, tmp_path_factory) -> Path:  # noqa: F811
    return quantized_checkpoint("mixtral", windows[:16], tokenizer, tmp_path_factory.mktemp("q") / "mixtral")


def test_the_copy_has_the_names_transformers_saves_and_reads_the_same(mixtral, windows, tmp_path) -> None:  # noqa: F811
    out = tmp_path / "for-vllm"
    run = subprocess.run([sys.executable, "-m", "app.cli", "original-names", str(mixtral), "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    ours, copied = checkpoint_names(mixtral), checkpoint_names(out)
    assert as_unquantized(copied) == saved_by_transformers("mixtral", tmp_path / "hf")
    assert as_unquantized(ours) != as_unquantized(copied)  # the original names were not ours
    assert any(".block_sparse_moe.experts.0.w1.qweight" in n for n in copied)
    renamed = len(ours - copied)
    assert f"{renamed} tensors renamed" in run.stdout and renamed > 0
    # everything else comes along unchanged
    assert json.loads((out / "config.json").read_text()) == json.loads((mixtral / "config.json").read_text())
    assert not (tmp_path / "for-vllm.partial").exists()
    # our loader reads the copy to the same model, whole and block by block
    reference, again = our_reading(mixtral, windows[16:]), our_reading(out, windows[16:])
    assert (again.logits == reference.logits).all()
    streamed = [_perplexity(str(path), "builtin-heldout", 64, 4, "text", False, "cpu")
                for path in (mixtral, out)]
    assert streamed[0]["streamed"] and streamed[0]["perplexity"] == streamed[1]["perplexity"]


@pytest.mark.parametrize("model_type", ["qwen2_moe", "qwen3_moe"])
def test_other_mixtures_already_carry_their_original_names(model_type, windows, tokenizer, tmp_path) -> None:  # noqa: F811
    checkpoint = quantized_checkpoint(model_type, windows[:8], tokenizer, tmp_path / model_type)
    assert as_unquantized(checkpoint_names(checkpoint)) == saved_by_transformers(model_type, tmp_path / "hf")
    with pytest.raises(EngineError, match="nothing to rename"):
        write_with_original_names(checkpoint, tmp_path / "copy")
    assert not (tmp_path / "copy").exists()


def resharded(checkpoint: Path, out: Path) -> Path:
    """checkpoint's files with its weights split over two shards named by an index, as
    `save_checkpoint(max_shard_size=...)` and the hub write large models."""
    shutil.copytree(checkpoint, out, ignore=lambda _, names: [n for n in names if n.endswith(".safetensors")])
    tensors = {k: v for file in checkpoint.glob("*.safetensors") for k, v in load_file(str(file)).items()}
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, str(out / file), metadata={"format": "pt"})
    weight_map = {k: file for file, keys in halves.items() for k in keys}
    (out / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


def test_a_sharded_checkpoint_is_renamed_shard_by_shard_with_its_index(mixtral, windows, tmp_path) -> None:  # noqa: F811
    sharded = resharded(mixtral, tmp_path / "sharded")
    renamed = write_with_original_names(sharded, tmp_path / "copy")
    out = tmp_path / "copy"
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(p.name for p in sharded.glob("*.safetensors"))
    weight_map = json.loads((out / INDEX_FILE).read_text())["weight_map"]
    for file in out.glob("*.safetensors"):  # the index names each tensor's own shard
        with safe_open(str(file), framework="pt") as f:
            assert {k for k, v in weight_map.items() if v == file.name} == set(f.keys())
    write_with_original_names(mixtral, tmp_path / "whole")
    assert set(weight_map) == checkpoint_names(tmp_path / "whole") == checkpoint_names(out)
    assert renamed == len(checkpoint_names(mixtral) - set(weight_map)) > 0
    assert (our_reading(out, windows[16:]).logits == our_reading(mixtral, windows[16:]).logits).all()


def test_an_existing_output_directory_is_refused(mixtral, tmp_path) -> None:
    (tmp_path / "taken").mkdir()
    with pytest.raises(EngineError, match="already exists"):
        write_with_original_names(mixtral, tmp_path / "taken")


@pytest.mark.parametrize("model_type", ["mixtral", "llama"])
def test_a_run_writes_the_original_names_when_asked(model_type, tmp_path) -> None:
    """api.quantize with tensor_names="original", streamed as the worker runs it: a Mixtral's
    checkpoint gets the names transformers saves, read back to the same numbers as the
    module-named run's; a Llama's (the same names either way) is bit for bit the same."""
    source = saved_tiny_model(model_type, tmp_path / "source")
    calibration = CalibrationSpec("builtin", num_samples=8, seq_length=64)
    runs = {names: quantize(str(source), tmp_path / names, QuantizeConfig(bits=4, group_size=32, tensor_names=names),
                            calibration, device="cpu", lazy=True) for names in ("module", "original")}
    assert all(run.lazy for run in runs.values())
    if model_type == "llama":
        assert assert_same_checkpoint(tmp_path / "module", tmp_path / "original") > 10
        return
    written = checkpoint_names(tmp_path / "original")
    assert as_unquantized(written) == checkpoint_names(source)  # the source's own names
    assert written != checkpoint_names(tmp_path / "module")
    scored = [_perplexity(str(tmp_path / names), "builtin-heldout", 64, 4, "text", False, "cpu")
              for names in ("module", "original")]
    assert scored[0]["perplexity"] == scored[1]["perplexity"]


def test_gptqmodel_still_refuses_the_original_names(mixtral, tmp_path) -> None:
    """Why the default stays "module": GPTQModel 7.6.0 asks for the transformers-5 names. If
    it ever reads the original ones, this fails: then "original" can become the default."""
    require("gptqmodel")
    write_with_original_names(mixtral, tmp_path / "copy")
    with pytest.raises(ValueError, match=r"Missing required quantized weights.*mlp\.experts\.0\."):
        gptqmodel_restoring(tmp_path / "copy", torch.float16)
