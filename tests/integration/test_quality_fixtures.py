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
