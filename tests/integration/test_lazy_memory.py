"""Lazy, block-by-block quantization writes the same checkpoint as loading the whole model,
with at most one decoder block's weights in memory at a time."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
import torch
import transformers as tf

from tests.conftest import fixture_path
from tests.integration.checkpoints import assert_same_checkpoint, saved_tiny_model, tiny_llama
from worker.gptq import compactblock, lazyload, pipeline
from worker.gptq.api import quantize
from worker.gptq.config import CalibrationSpec, QuantizeConfig
from worker.gptq.errors import EngineError
from worker.gptq.evaluate import EvalSpec

CALIBRATION = CalibrationSpec("builtin", num_samples=8, seq_length=64)


@pytest.fixture(scope="module")
def sharded_llama(tmp_path_factory) -> Path:
    """Untied Llama saved in several safetensors shards (read through the index)."""
    path = tiny_llama(tmp_path_factory.mktemp("llama-sharded"), layers=3)
    model = tf.AutoModelForCausalLM.from_pretrained(path)
    for f in path.glob("*.safetensors"):
        f.unlink()
    model.save_pretrained(path, max_shard_size="60KB")
    assert (path / "model.safetensors.index.json").is_file()
    return path


@pytest.fixture(scope="module")
def fp16_llama(tmp_path_factory) -> Path:
    """The same Llama stored in fp16, as checkpoints usually are: the streamed blocks keep their
    linears in fp16 and solved ones as codes (compactblock.py) while the forward runs in fp32."""
    path = tiny_llama(tmp_path_factory.mktemp("llama-fp16"), layers=3)
    model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float16)
    for f in path.glob("*.safetensors"):
        f.unlink()
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def gpt2_copy(tmp_path_factory) -> Path:
    """The trained GPT-2 fixture: tied head, Conv1D, biases."""
    path = tmp_path_factory.mktemp("gpt2") / "model"
    shutil.copytree(fixture_path("models", "tiny-gpt2-wikitext2"), path)
    return path


@pytest.mark.parametrize(
    ("model", "config"),
    [
        ("sharded_llama", QuantizeConfig(bits=4, group_size=32)),
        ("fp16_llama", QuantizeConfig(bits=4, group_size=32, desc_act=True)),
        ("gpt2_copy", QuantizeConfig(bits=3, group_size=32, desc_act=True, sym=False)),
    ],
)
def test_lazy_checkpoint_is_bit_identical_to_the_whole_model_path(model, config, request, tmp_path, monkeypatch):
    source = request.getfixturevalue(model)
    eager = quantize(str(source), tmp_path / "eager", config, CALIBRATION, device="cpu", lazy=False)

    resident: list[int] = []
    outside: list[int] = []
    materialized: list[int] = []
    load_block = lazyload.LazyModel.load_block
    materialize = compactblock.CompactLinears._weight

    def counting_materialize(self, module):
        # what the module holds between calls: its stored dtype, or a meta stand-in once solved
        held = self._held[module]
        materialized.append(held.dtype if held.device.type != "meta" else "codes")
        return materialize(self, module)

    monkeypatch.setattr(compactblock.CompactLinears, "_weight", counting_materialize)
    # the fp32 weights made for a pass are gone before anything is solved (the solve is the peak)
    compacts: list[compactblock.CompactLinears] = []
    held_at_solves: list[int] = []
    init, solve_together = compactblock.CompactLinears.__init__, pipeline.solve_together

    def tracked_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        compacts.append(self)

    def checked_solve(*args, **kwargs):
        held_at_solves.append(sum(len(c._made) for c in compacts))
        return solve_together(*args, **kwargs)

    monkeypatch.setattr(compactblock.CompactLinears, "__init__", tracked_init)
    monkeypatch.setattr(pipeline, "solve_together", checked_solve)

    def counting(self, index, block, as_stored=()):
        # blocks holding real weights when the next one is read: the finished ones must be gone
        blocks = self.arch.blocks(self.model)
        resident.append(sum(any(p.device.type != "meta" for p in b.parameters()) for b in blocks))
        # embeddings, norm and head are not needed after the capture: read again at export
        outside.append(sum(p.device.type != "meta" for n, p in self.model.named_parameters()
                           if not n.startswith(self.arch.blocks_path + ".")))
        load_block(self, index, block, as_stored)

    monkeypatch.setattr(lazyload.LazyModel, "load_block", counting)
    lazy = quantize(str(source), tmp_path / "lazy", config, CALIBRATION, device="cpu", lazy=True)

    assert not eager.lazy and lazy.lazy
    assert resident == [0] * lazy.num_blocks
    assert outside == [0] * lazy.num_blocks
    # the linears were held as stored (then as codes) and made fp32 only to run
    stored = torch.float16 if model == "fp16_llama" else torch.float32
    assert "codes" in materialized and set(materialized) <= {stored, "codes"}
    assert len(compacts) == lazy.num_blocks and held_at_solves and not any(held_at_solves)
    assert assert_same_checkpoint(tmp_path / "eager", tmp_path / "lazy") > 10
    assert [m["loss"] for m in lazy.modules] == [m["loss"] for m in eager.modules]
    assert lazy.sizes["quantized_parameters"] == eager.sizes["quantized_parameters"]
    assert lazy.sizes["parameters"] == eager.sizes["parameters"]  # a tied head counted once
    # the temporary work dir next to the output is gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eager", "lazy"]


def test_lazy_is_the_default_for_a_local_directory(sharded_llama, tmp_path):
    """(With evaluation too: tests/integration/test_streameval.py.)"""
    config = QuantizeConfig(bits=4, group_size=32)
    assert quantize(str(sharded_llama), tmp_path / "a", config, CALIBRATION, device="cpu").lazy


def test_lazy_refused_for_a_directory_without_safetensors(tmp_path):
    source = tiny_llama(tmp_path / "m", layers=1)
    for f in source.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(EngineError, match="no safetensors weights"):
        quantize(str(source), tmp_path / "out", QuantizeConfig(group_size=32), CALIBRATION,
                 device="cpu", lazy=True)


@pytest.mark.parametrize(("evaluate", "expected"), [(None, True), (EvalSpec("builtin", seq_length=32, max_windows=2), False)])
def test_glibc_is_told_before_the_first_weight(tmp_path: Path, monkeypatch, evaluate, expected) -> None:
    """A run that streams sets glibc's thresholds before any weight is read (done after
    loading, about half the runs kept ~150 MiB more in the brk heap); a whole-model run (here:
    samples asked for, and the model fits) leaves the allocator alone."""
    from worker.gptq import api

    model = tiny_llama(tmp_path / "m", layers=1)
    told: list[str] = []
    monkeypatch.setattr(api, "return_freed_memory", lambda: told.append("mallopt"))
    for reader in ("open_streamed", "load_model"):
        original = getattr(api, reader)
        monkeypatch.setattr(api, reader, lambda *a, _f=original, **k: (told.append("weights"), _f(*a, **k))[1])
    quantize(str(model), tmp_path / "out", QuantizeConfig(bits=4, group_size=32), CALIBRATION,
             device="cpu", evaluate=evaluate)
    assert told == (["mallopt", "weights"] if expected else ["weights"])


@pytest.mark.parametrize("model_type", ["qwen3_moe", "qwen2_moe", "mixtral"])
def test_a_mixture_of_experts_is_streamed_block_by_block_too(model_type, tmp_path) -> None:
    """Its files hold one linear per expert (Mixtral's as block_sparse_moe.experts.E.w1/w3/w2):
    read a block at a time like a dense model, the same checkpoint as reading it whole."""
    source = saved_tiny_model(model_type, tmp_path / "source")
    config = QuantizeConfig(bits=4, group_size=32)
    eager = quantize(str(source), tmp_path / "eager", config, CALIBRATION, device="cpu", lazy=False)
    lazy = quantize(str(source), tmp_path / "lazy", config, CALIBRATION, device="cpu", lazy=True)
    assert lazy.lazy and not eager.lazy
    assert assert_same_checkpoint(tmp_path / "eager", tmp_path / "lazy") > 10
    assert [m["loss"] for m in lazy.modules] == [m["loss"] for m in eager.modules]
    assert [m["routed_tokens"] for m in lazy.modules] == [m["routed_tokens"] for m in eager.modules]


def _block_of(keys: list[str]) -> int | None:
    """The decoder block a read is for (None: embeddings, norm, head)."""
    blocks = {int(k.split(".")[2]) for k in keys if k.startswith("model.layers.")}
    return blocks.pop() if len(blocks) == 1 else None


def test_read_ahead_reads_the_next_block_in_a_thread_and_changes_nothing(sharded_llama, tmp_path, monkeypatch):
    """What a GPU run does (api.READ_AHEAD_DEVICES): block i+1 is read by a thread, asked for
    before block i is solved; the checkpoint is the same bit for bit."""
    from worker.gptq import api, blockstore

    config = QuantizeConfig(bits=4, group_size=32)
    plain = quantize(str(sharded_llama), tmp_path / "plain", config, CALIBRATION, device="cpu")

    events: list[tuple] = []
    read, start, solved = lazyload.WeightFiles.read, lazyload.ReadAhead.start, blockstore.BlockStore.solved

    def recording_read(self, keys):
        events.append(("read", _block_of(keys), threading.current_thread().name))
        return read(self, keys)

    def recording_start(self, index, keys):
        events.append(("ahead", index))
        start(self, index, keys)

    def recording_solved(self, name, module, layer):
        events.append(("solved", int(name.split(".")[2])))
        return solved(self, name, module, layer)

    monkeypatch.setattr(api, "READ_AHEAD_DEVICES", ("cpu",))
    monkeypatch.setattr(lazyload.WeightFiles, "read", recording_read)
    monkeypatch.setattr(lazyload.ReadAhead, "start", recording_start)
    monkeypatch.setattr(blockstore.BlockStore, "solved", recording_solved)
    ahead = quantize(str(sharded_llama), tmp_path / "ahead", config, CALIBRATION, device="cpu")

    n = ahead.num_blocks
    block_reads = {e[1]: e[2] for e in events if e[0] == "read" and e[1] is not None}
    assert block_reads[0] == "MainThread"
    assert all(block_reads[i].startswith("gptqd-readahead") for i in range(1, n)), block_reads
    for i in range(n - 1):  # asked for before the current block's first solve: they overlap
        assert events.index(("ahead", i + 1)) < events.index(("solved", i))
    assert ("ahead", n) not in events
    assert assert_same_checkpoint(tmp_path / "plain", tmp_path / "ahead") > 10
    assert [m["loss"] for m in ahead.modules] == [m["loss"] for m in plain.modules]
    assert not [t for t in threading.enumerate() if t.name.startswith("gptqd-readahead")]


def test_a_failed_read_ahead_fails_the_run_with_its_error(sharded_llama, tmp_path, monkeypatch):
    from worker.gptq import api

    read = lazyload.WeightFiles.read

    def failing(self, keys):
        if _block_of(keys) == 2:
            raise OSError(5, "Input/output error", "model-00002.safetensors")
        return read(self, keys)

    monkeypatch.setattr(api, "READ_AHEAD_DEVICES", ("cpu",))
    monkeypatch.setattr(lazyload.WeightFiles, "read", failing)
    with pytest.raises(OSError, match="Input/output error"):
        quantize(str(sharded_llama), tmp_path / "out", QuantizeConfig(bits=4, group_size=32),
                 CALIBRATION, device="cpu")
    assert not [t for t in threading.enumerate() if t.name.startswith("gptqd-readahead")]
