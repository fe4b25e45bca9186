"""Regression checks on a real trained model: GPTQ must beat round-to-nearest, and group-aware
reordering must not lose more than the natural column order.

tiny-gpt2-wikitext2 (GPT-2 with Conv1D layers), calibration from wikitext-2 valid.txt, perplexity
and KL to the original (the finer measure) on windows of test.txt; RTN applied to exactly the layers GPTQ quantizes.
bench/quality.py produces the full table in docs/engine.md.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tests.conftest import fixture_path
from worker.gptq.calibration import build_calibration
from worker.gptq.config import CalibrationSpec, QuantizeConfig
from worker.gptq.evaluate import (
    agreement,
    eval_windows,
    load_texts,
    rtn_quantize_model,
    window_perplexity,
)
from worker.gptq.modelio import load_model
from worker.gptq.pipeline import quantize_model

pytestmark = pytest.mark.fixtures

EVAL_WINDOWS = 48


def test_gptq_beats_rtn_on_tiny_gpt2_at_4bit_g128():
    """Judged by KL to the original over every position (the finer measure): perplexity at 4 bits
    moves with float noise here (GPTQ 66.064 or 66.215 on two CPUs against RTN's 66.22, with
    near-identical KL). Measured KL: GPTQ 0.0014, RTN 0.0040."""
    model_dir = fixture_path("models", "tiny-gpt2-wikitext2")
    loaded = load_model(str(model_dir))
    model, tokenizer = loaded.model, loaded.tokenizer
    calib = build_calibration(tokenizer, CalibrationSpec(
        source=str(fixture_path("wikitext-2", "valid.txt")), num_samples=32, seq_length=256,
    ))
    windows = eval_windows(
        tokenizer, load_texts(str(fixture_path("wikitext-2", "test.txt"))), 256, EVAL_WINDOWS
    )
    config = QuantizeConfig(bits=4, group_size=128)

    assert 20 < window_perplexity(model, windows) < 200  # a trained model, read correctly
    rtn, gptq = copy.deepcopy(model), copy.deepcopy(model)
    rtn_quantize_model(rtn, config)
    quantize_model(gptq, calib, config, device="cpu")
    kl_rtn, kl_gptq = agreement(model, rtn, windows)["kl"], agreement(model, gptq, windows)["kl"]
    # GPTQ removes a real part of RTN's loss, not a rounding-noise amount
    assert 0 < kl_gptq < 0.6 * kl_rtn, (kl_gptq, kl_rtn)


def test_group_aware_order_loses_no_more_than_the_natural_order_on_tiny_gpt2():
    """3-bit g128, the issue's setting (the MLP's 512-wide input has 4 groups to order).
    Measured KL 0.00602 vs 0.00626."""
    loaded = load_model(str(fixture_path("models", "tiny-gpt2-wikitext2")))
    model, tokenizer = loaded.model, loaded.tokenizer
    calib = build_calibration(tokenizer, CalibrationSpec(
        source=str(fixture_path("wikitext-2", "valid.txt")), num_samples=32, seq_length=128,
    ))
    windows = eval_windows(
        tokenizer, load_texts(str(fixture_path("wikitext-2", "test.txt"))), 128, EVAL_WINDOWS
    )
    kl = {}
    for group_aware in (True, False):
        quantized = copy.deepcopy(model)
        config = QuantizeConfig(bits=3, group_size=128, act_group_aware=group_aware)
        result = quantize_model(quantized, calib, config, device="cpu")
        assert all(torch.equal(layer.g_idx, torch.arange(layer.g_idx.numel(), dtype=torch.int32) // 128)
                   for layer in result.layers.values())
        kl[group_aware] = agreement(model, quantized, windows)["kl"]
    assert kl[True] <= kl[False], kl


def test_a_run_reports_the_kl_and_agreement_its_checkpoint_has(tmp_path):
    """quantize(evaluate=...) reports how far quantizing moved the next-token distributions:
    the KL and top-1 agreement that a judge finds between the original and the checkpoint read
    back from disk, on the same windows; 3-bit moves them further than 4-bit."""
    from worker.gptq.api import quantize
    from worker.gptq.evaluate import EvalSpec
    from worker.gptq.loader import load_quantized

    model_dir = fixture_path("models", "babyllama-tok105")
    spec = EvalSpec(source=str(fixture_path("tinystories", "tinystories_sample_cs336.txt")),
                    seq_length=128, max_windows=16, prompts=())
    calibration = CalibrationSpec(source=str(fixture_path("tinystories", "tinystories_valid_excerpt.txt")),
                                  num_samples=16, seq_length=128)
    reports = {bits: quantize(str(model_dir), tmp_path / f"{bits}bit", QuantizeConfig(bits=bits, group_size=32),
                              calibration, device="cpu", evaluate=spec)
               for bits in (4, 3)}
    original = load_model(str(model_dir))
    windows = eval_windows(original.tokenizer, load_texts(spec.source), 128, 16)
    for bits, report in reports.items():
        checkpoint, _ = load_quantized(tmp_path / f"{bits}bit", dtype=torch.float32)
        judged = agreement(original.model, checkpoint, windows)
        assert report.kl_divergence == pytest.approx(judged["kl"], rel=0.002), bits
        assert report.top1_agreement == pytest.approx(judged["top1"], abs=0.003), bits
    assert reports[3].kl_divergence > 2 * reports[4].kl_divergence
    assert reports[3].top1_agreement < reports[4].top1_agreement
