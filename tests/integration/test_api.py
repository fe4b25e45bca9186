"""quantize(): a local model directory to a checkpoint and a report, and the refusals before work."""

from __future__ import annotations

import errno
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import transformers as tf
from transformers import AutoTokenizer

from tests.conftest import fixture_path
from worker.gptq import api, export, pipeline
from worker.gptq.api import quantize
from worker.gptq.config import CalibrationSpec, QuantizeConfig
from worker.gptq.errors import CalibrationError, DiskFull, EngineError, LayerShapeError, OutOfMemory
from worker.gptq.evaluate import EvalSpec, eval_windows, load_texts, window_perplexity
from worker.gptq.loader import load_quantized
from worker.gptq.progress import Cancelled, ProgressEvent

CALIBRATION = CalibrationSpec("builtin", num_samples=16, seq_length=64)
CONFIG = QuantizeConfig(bits=4, group_size=32)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama with the character tokenizer of the babyllama fixture (105 ids)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = tf.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=256,
    )
    tf.LlamaForCausalLM(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(fixture_path("models", "babyllama-tok105")).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def eval_spec() -> EvalSpec:
    source = fixture_path("tinystories", "tinystories_valid_excerpt.txt")
    return EvalSpec(source=str(source), seq_length=64, max_windows=8, max_new_tokens=4)


def _stages(events: list[ProgressEvent]) -> list[str]:
    """Stage names in order, repeats collapsed."""
    names: list[str] = []
    for event in events:
        if not names or names[-1] != event.stage:
            names.append(event.stage)
    return names


def test_stage_times_wait_for_an_asynchronous_device(model_dir, tmp_path, monkeypatch) -> None:
    """On CUDA a call returns before its kernels run: unless a stage's clock waits for the
    device (pipeline.settle), its time lands on whichever later stage waits first. Simulated
    on the CPU by a clock that moves only while the host waits for the device: every stage
    must have waited for its own work."""

    class DeviceClock:
        now = 0.0

        def perf_counter(self) -> float:
            return self.now

        def wait(self, device: torch.device) -> None:
            self.now += 1.0

    clock = DeviceClock()
    monkeypatch.setattr(pipeline, "time", clock)
    monkeypatch.setattr(pipeline, "settle", clock.wait)
    report = quantize(str(model_dir), tmp_path / "out", CONFIG, CALIBRATION, device="cpu", lazy=True)
    for stage in ("capture", "loading", "forward", "hessian", "solve", "packing", "storing"):
        assert report.stage_seconds[f"quantizing.{stage}"] > 0, stage


def test_a_misspelt_column_kernel_is_refused_before_any_weight_is_read(
    model_dir, tmp_path, monkeypatch
) -> None:
    monkeypatch.setenv("GPTQD_COLUMN_KERNEL", "fast")
    monkeypatch.setattr(api, "load_config", lambda *a, **k: pytest.fail("the model was opened"))
    with pytest.raises(EngineError, match="GPTQD_COLUMN_KERNEL='fast' is not a column kernel"):
        quantize(str(model_dir), tmp_path / "out", CONFIG, CALIBRATION, device="cpu")
    assert not (tmp_path / "out").exists()


def test_quantize_writes_a_checkpoint_and_an_honest_report(model_dir, eval_spec, tmp_path) -> None:
    out = tmp_path / "out"
    events: list[ProgressEvent] = []
    report = quantize(str(model_dir), out, CONFIG, CALIBRATION, progress=events.append,
                      evaluate=eval_spec, device="cpu")
    data = report.to_dict()
    json.dumps(data)  # JSON-able as the service stores it

    assert data["model_type"] == "llama" and data["num_blocks"] == 2
    assert len(data["modules"]) == 14
    assert data["modules"][0]["name"] == "model.layers.0.self_attn.q_proj"
    assert all(m["loss"] >= 0 and m["damp_percent"] == 0.01 for m in data["modules"])
    before, after = report.perplexity_before, report.perplexity_after
    assert math.isfinite(before) and math.isfinite(after)
    assert abs(after - before) / before < 0.05  # 4-bit g32 barely moves a tiny model
    assert len(data["evaluation"]["samples_after"]) == 2
    sizes = data["sizes"]
    # per block: q and o 64x64, k and v 32x64 (2 kv heads), gate/up/down 64x128
    assert sizes["quantized_parameters"] == 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 128)
    assert 0 < sizes["weights_bytes"] < sizes["original_bytes"]
    for stage in ("loading", "calibration", "evaluating_before", "quantizing",
                  "evaluating_after", "saving", "quantizing.solve"):
        assert data["stage_seconds"][stage] > 0, stage
    assert data["duration_seconds"] >= sum(
        v for k, v in data["stage_seconds"].items() if "." not in k
    ) * 0.99
    assert data["peak_memory"]["rss_bytes"] > 10 * 2**20
    assert data["column_kernel"] == "torch"  # the CPU's path

    assert _stages(events) == ["loading", "calibration", "evaluating", "quantizing",
                               "evaluating", "saving", "done"]
    fractions = [e.fraction for e in events]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    quantizing = [e.fraction for e in events if e.stage == "quantizing"]
    assert quantizing[-1] == pytest.approx(api.stage_ends(True)["quantizing"])
    blocks = [e.block for e in events if e.stage == "quantizing" and e.module]
    assert blocks == [1] * 7 + [2] * 7

    for name in ("config.json", "quantize_config.json", "model.safetensors", "tokenizer.json"):
        assert (out / name).is_file(), name
    assert set(data["files"]) >= {"model.safetensors", export.REPORT_NAME}
    written = json.loads((out / export.REPORT_NAME).read_text())
    assert written["sizes"] == sizes and written["perplexity_after"] == after
    assert len(written["modules"]) == 14

    # the checkpoint as the loader reads it scores what the report says
    reloaded, tokenizer = load_quantized(out)
    windows = eval_windows(tokenizer, load_texts(eval_spec.source), 64, 8)
    assert window_perplexity(reloaded, windows) == pytest.approx(after, rel=2e-3)


def test_layers_that_cannot_be_packed_are_refused_before_weights_are_read(tmp_path) -> None:
    # only the config of stories260k (MLP width 172): no weights, no tokenizer needed to refuse
    model = tmp_path / "stories260k"
    model.mkdir()
    shutil.copy(fixture_path("models", "stories260k", "config.json"), model / "config.json")
    with pytest.raises(LayerShapeError, match=r"model\.layers\.0\.mlp\.gate_proj"):
        quantize(str(model), tmp_path / "out", CONFIG, CALIBRATION)
    assert not (tmp_path / "out").exists()


def test_calibration_longer_than_the_context_is_refused(model_dir, tmp_path) -> None:
    spec = CalibrationSpec("builtin", num_samples=4, seq_length=512)
    with pytest.raises(CalibrationError, match="seq_length 512 exceeds the model's context length 256"):
        quantize(str(model_dir), tmp_path / "out", CONFIG, spec)


def test_a_non_empty_output_directory_is_refused(model_dir, tmp_path) -> None:
    (tmp_path / "keep.txt").write_text("someone's file")
    with pytest.raises(EngineError, match="is not empty"):
        quantize(str(model_dir), tmp_path, CONFIG, CALIBRATION)


def test_should_stop_cancels_and_writes_nothing(model_dir, tmp_path) -> None:
    calls = iter(range(1000))
    with pytest.raises(Cancelled):
        quantize(str(model_dir), tmp_path / "out", CONFIG, CALIBRATION,
                 should_stop=lambda: next(calls) >= 6)
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_out_of_memory_says_what_to_lower(model_dir, tmp_path, monkeypatch) -> None:
    def exhausted(*args, **kwargs):  # torch's own wording on a CUDA device
        raise torch.OutOfMemoryError(
            "CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of "
            "23.64 GiB of which 1.10 GiB is free. Including non-PyTorch memory, this process "
            "has 22.51 GiB memory in use. If reserved but unallocated memory is large try "
            "setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True")

    monkeypatch.setattr(api, "quantize_model", exhausted)
    with pytest.raises(OutOfMemory, match="while quantizing: lower num_samples or seq_length") as info:
        quantize(str(model_dir), tmp_path / "out", CONFIG, CALIBRATION)
    assert info.value.code == "out_of_memory"
    # the GPU's numbers, without torch's allocator advice
    assert "Tried to allocate 20.00 GiB" in info.value.message
    assert "total capacity of 23.64 GiB of which 1.10 GiB is free" in info.value.message
    assert "PYTORCH_CUDA_ALLOC_CONF" not in info.value.message


def test_bad_text_files_are_refused_before_any_weight_is_read(model_dir, tmp_path, monkeypatch
                                                              ) -> None:
    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the text files were checked")

    monkeypatch.setattr(api, "load_model", never)
    monkeypatch.setattr(api, "open_streamed", never)
    missing = CalibrationSpec(str(tmp_path / "nope.txt"), num_samples=16, seq_length=64)
    with pytest.raises(CalibrationError, match=r"calibration file .*nope\.txt does not exist"):
        quantize(str(model_dir), tmp_path / "a", CONFIG, missing)
    bad_eval = EvalSpec(source=str(tmp_path / "wiki.test.raw"), seq_length=64)
    with pytest.raises(CalibrationError, match=r"eval text file .*wiki\.test\.raw does not exist"):
        quantize(str(model_dir), tmp_path / "b", CONFIG, CALIBRATION, evaluate=bad_eval)


def test_a_full_disk_is_reported_as_such(model_dir, tmp_path, monkeypatch) -> None:
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export, "save_checkpoint", full)
    with pytest.raises(DiskFull, match="no space left on device while saving") as info:
        quantize(str(model_dir), tmp_path / "out", CONFIG, CALIBRATION)
    assert info.value.code == "disk_full"


@pytest.mark.parametrize(("stage", "advice"), [
    ("loading", "in the hub cache (HF_HOME or HF_HUB_CACHE"),
    ("saving", "or write to another output directory"),
])
def test_a_full_disk_says_which_disk_to_free(stage: str, advice: str) -> None:
    error = api.map_resource_error(OSError(errno.ENOSPC, "No space left on device"), stage)
    assert isinstance(error, DiskFull) and advice in str(error), error


@pytest.mark.parametrize(("stage", "advice"), [
    ("quantizing", "lower num_samples or seq_length of the calibration"),
    ("evaluating", "lower max_windows or seq_length of the evaluation"),
])
def test_running_out_of_memory_says_what_to_lower(stage: str, advice: str) -> None:
    error = api.map_resource_error(MemoryError(), stage)
    assert isinstance(error, OutOfMemory) and advice in str(error), error


def test_stage_shares_fill_the_whole_run() -> None:
    with_eval, without = api.stage_ends(True), api.stage_ends(False)
    assert list(with_eval) == ["loading", "calibration", "evaluating_before", "quantizing",
                               "evaluating_after", "saving"]
    assert list(with_eval.values()) == sorted(with_eval.values()) and with_eval["saving"] == 1.0
    assert "evaluating_before" not in without and without["saving"] == 1.0
    assert without["quantizing"] > with_eval["quantizing"]  # no eval: quantizing gets its share


@pytest.mark.parametrize(("device", "reason"), [("tpu", "not a torch device"), ("meta", "not supported")])
def test_a_bad_device_is_refused_before_loading(model_dir, tmp_path, device, reason) -> None:
    with pytest.raises(EngineError, match=reason):
        quantize(str(model_dir), tmp_path / "out", CONFIG, CALIBRATION, device=device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_refused(model_dir, tmp_path) -> None:
    with pytest.raises(EngineError, match="no usable CUDA GPU"):
        quantize(str(model_dir), tmp_path / "out", CONFIG, CALIBRATION, device="cuda")
