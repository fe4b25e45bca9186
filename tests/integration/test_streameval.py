"""Perplexity measured while the model is streamed block by block (streameval.py) equals the
whole model's, bit for bit; samples keep the whole model while it fits (residency.py)."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from tests.conftest import fixture_path
from tests.integration.checkpoints import assert_same_checkpoint, saved_tiny_model, tiny_llama
from worker.gptq import residency
from worker.gptq.api import quantize
from worker.gptq.config import CalibrationSpec, QuantizeConfig
from worker.gptq.evaluate import EvalSpec
from worker.gptq.modelio import skeleton

CALIBRATION = CalibrationSpec("builtin", num_samples=8, seq_length=64)
CONFIG = QuantizeConfig(bits=4, group_size=32)
# perplexity only: nothing needs the whole model
EVAL = EvalSpec(source=str(fixture_path("tinystories", "tinystories_valid_excerpt.txt")),
                seq_length=64, max_windows=5, prompts=())
WITH_SAMPLES = dataclasses.replace(EVAL, prompts=("Once upon a time",), max_new_tokens=4)


def _source(kind: str, root: Path) -> Path:
    if kind == "gpt2-trained":  # tied head, Conv1D, a final ln_f; a 50k vocabulary
        path = root / "gpt2"
        shutil.copytree(fixture_path("models", "tiny-gpt2-wikitext2"), path)
        return path
    if kind == "llama-untied":
        return tiny_llama(root / "llama", layers=3)
    return saved_tiny_model(kind, root / kind)


@pytest.mark.parametrize("kind", ["llama-untied", "gpt2-trained", "gemma2", "opt", "mixtral"])
def test_streamed_perplexity_is_the_whole_model_s(kind: str, tmp_path: Path) -> None:
    """gemma2: final logits soft-capped; opt: a projection after the final norm; mixtral:
    routed experts (calibrated on every token, evaluated as routed)."""
    source = _source(kind, tmp_path)
    whole = quantize(str(source), tmp_path / "whole", CONFIG, CALIBRATION, device="cpu",
                     evaluate=EVAL, lazy=False)
    streamed = quantize(str(source), tmp_path / "streamed", CONFIG, CALIBRATION, device="cpu",
                        evaluate=EVAL)
    assert streamed.lazy and not whole.lazy
    assert streamed.perplexity_before == whole.perplexity_before
    assert streamed.perplexity_after == whole.perplexity_after
    assert streamed.perplexity_after != streamed.perplexity_before
    # how far the distributions moved: the same numbers, from the original's states kept
    # before quantizing (whole) or carried along (streamed)
    assert streamed.kl_divergence == whole.kl_divergence > 0
    assert streamed.top1_agreement == whole.top1_agreement
    assert 0 < whole.top1_agreement < 1
    assert streamed.evaluation["windows"] == whole.evaluation["windows"] == 5
    assert assert_same_checkpoint(tmp_path / "whole", tmp_path / "streamed") > 10


def test_samples_keep_the_whole_model_while_it_fits(tmp_path: Path, monkeypatch) -> None:
    source = tiny_llama(tmp_path / "llama", layers=2)
    fits = quantize(str(source), tmp_path / "fits", CONFIG, CALIBRATION, device="cpu",
                    evaluate=WITH_SAMPLES)
    assert not fits.lazy
    assert fits.evaluation["samples_before"] and fits.evaluation["samples_after"]
    assert "samples_skipped" not in fits.evaluation

    # the whole model (fp32) would take more than half of what is free: streamed, no samples
    need = residency.whole_model_bytes(skeleton(AutoConfig.from_pretrained(source)), torch.device("cpu"))
    monkeypatch.setattr(residency, "available_memory", lambda compute: need * 2 - 1)
    tight = quantize(str(source), tmp_path / "tight", CONFIG, CALIBRATION, device="cpu",
                     evaluate=WITH_SAMPLES)
    assert tight.lazy
    assert "samples_after" not in tight.evaluation
    skipped = tight.evaluation["samples_skipped"]
    assert skipped.startswith("greedy samples need the whole model: the whole model (")
    assert "GiB available, so it was read block by block" in skipped
    assert (tight.perplexity_before, tight.perplexity_after) == (fits.perplexity_before, fits.perplexity_after)

    asked = quantize(str(source), tmp_path / "asked", CONFIG, CALIBRATION, device="cpu",
                     evaluate=WITH_SAMPLES, lazy=True)
    assert asked.evaluation["samples_skipped"] == "greedy samples need the whole model: lazy loading was asked for"



def test_a_verification_keeps_dequantized_weights_only_while_they_fit(tmp_path: Path, monkeypatch) -> None:
    """residency.load_checkpoint (what a verification job loads): the same perplexity either
    way, but a model too large to hold dequantized keeps only its packed weights."""
    from worker.gptq.evaluate import window_perplexity
    from worker.gptq.loader import DequantLinear

    source = tiny_llama(tmp_path / "llama", layers=2)
    quantize(str(source), tmp_path / "ckpt", CONFIG, CALIBRATION, device="cpu")
    windows = torch.randint(0, 128, (3, 32), generator=torch.Generator().manual_seed(0))

    def loaded_layers() -> tuple[list[DequantLinear], float]:
        model, tokenizer = residency.load_checkpoint(tmp_path / "ckpt", torch.device("cpu"))
        assert tokenizer is not None
        return [m for m in model.modules() if isinstance(m, DequantLinear)], window_perplexity(model, windows)

    roomy, ppl_roomy = loaded_layers()
    assert len(roomy) == 14 and all(m._cached_weight is not None for m in roomy)
    monkeypatch.setattr(residency, "available_memory", lambda compute: 1)
    tight, ppl_tight = loaded_layers()
    assert len(tight) == 14 and all(m._cached_weight is None for m in tight)
    assert ppl_tight == ppl_roomy


@pytest.mark.parametrize("kind", ["gpt2-trained", "gemma2", "opt"])
def test_a_model_scored_block_by_block_gives_the_whole_model_s_perplexity(kind: str, tmp_path: Path) -> None:
    """streameval.streamed_perplexity (`gptqd eval` on an original model): one block in memory,
    the number window_perplexity gives on the whole model."""
    from worker.gptq.evaluate import eval_windows, load_texts, window_perplexity
    from worker.gptq.lazyload import open_lazy
    from worker.gptq.modelio import load_config, load_model
    from worker.gptq.streameval import streamed_perplexity

    source = _source(kind, tmp_path)
    whole = load_model(str(source))
    windows = eval_windows(whole.tokenizer, load_texts(EVAL.source), 64, 6)
    config, arch = load_config(str(source))
    lazy, why = open_lazy(source, config, arch, torch.float32)
    assert lazy is not None, why
    assert streamed_perplexity(lazy, windows, torch.device("cpu")) == window_perplexity(whole.model, windows)
    blocks = arch.blocks(lazy.model)
    assert all(p.device.type == "meta" for block in blocks for p in block.parameters())


@pytest.mark.parametrize("kind", ["llama-untied", "gpt2-trained", "gemma2", "mixtral"])
def test_a_checkpoint_scored_block_by_block_gives_the_whole_checkpoint_s_perplexity(
        kind: str, tmp_path: Path) -> None:
    """lazycheckpoint.py (`gptqd eval` on a GPTQ checkpoint; a verification of a model too
    large to hold): the number our loader's whole model gives, one block in memory."""
    from worker.gptq.evaluate import eval_windows, load_texts, window_perplexity
    from worker.gptq.lazycheckpoint import open_lazy_checkpoint
    from worker.gptq.loader import load_quantized
    from worker.gptq.streameval import streamed_perplexity

    quantize(str(_source(kind, tmp_path)), tmp_path / "ckpt", CONFIG, CALIBRATION, device="cpu")
    whole, tokenizer = load_quantized(tmp_path / "ckpt")
    windows = eval_windows(tokenizer, load_texts(EVAL.source), 64, 6)
    lazy = open_lazy_checkpoint(tmp_path / "ckpt", torch.device("cpu"))
    assert lazy is not None
    assert streamed_perplexity(lazy, windows, torch.device("cpu")) == window_perplexity(whole, windows)
    assert all(t.device.type == "meta" for block in lazy.arch.blocks(lazy.model)
               for t in [*block.parameters(), *block.buffers()])


@pytest.mark.parametrize("kind", ["llama-untied", "gemma2"])
def test_two_models_compare_alike_held_whole_or_read_block_by_block(kind: str, tmp_path: Path) -> None:
    """streameval.compare_models (`gptqd eval --reference`): a checkpoint against its original,
    each held whole or read block by block, gives the numbers the two whole models give."""
    from worker.gptq.evaluate import agreement, eval_windows, load_texts, window_perplexity
    from worker.gptq.lazycheckpoint import open_lazy_checkpoint
    from worker.gptq.lazyload import open_lazy
    from worker.gptq.loader import load_quantized
    from worker.gptq.modelio import load_config, load_model
    from worker.gptq.streameval import Held, compare_models, last_states

    source = _source(kind, tmp_path)
    quantize(str(source), tmp_path / "ckpt", CONFIG, CALIBRATION, device="cpu")
    original = load_model(str(source)).model
    checkpoint, tokenizer = load_quantized(tmp_path / "ckpt")
    windows = eval_windows(tokenizer, load_texts(EVAL.source), 64, 6)
    cpu = torch.device("cpu")
    config, arch = load_config(str(source))
    ways = {}
    for streamed in (False, True):
        if streamed:
            lazy, _ = open_lazy(source, config, arch, torch.float32)
            lazy_checkpoint = open_lazy_checkpoint(tmp_path / "ckpt", cpu)
            reference, candidate = Held(lazy.model, lazy), Held(lazy_checkpoint.model, lazy_checkpoint)
        else:
            reference, candidate = Held(original, None), Held(checkpoint, None)
        states = (last_states(reference, windows, cpu), last_states(candidate, windows, cpu))
        ways[streamed] = compare_models(reference, candidate, windows, states, cpu)
    assert ways[True] == ways[False]
    judged = agreement(original, checkpoint, windows)
    assert ways[False]["kl_divergence"] == pytest.approx(judged["kl"], rel=1e-6)
    assert ways[False]["top1_agreement"] == judged["top1"] < 1
    assert ways[False]["perplexity"] == window_perplexity(checkpoint, windows)
    assert ways[False]["reference_perplexity"] == window_perplexity(original, windows)
