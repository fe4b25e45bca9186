"""A mixture of experts trained on real text (tests/trained_moe.py): GPTQ beats round-to-
nearest on held-out perplexity, every routed expert is quantized, and the report's per-expert
routed token counts add up to the tokens the router sent."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.trained_moe import HELD_OUT_TEXT, TRAIN_TEXT, MoeSpec, trained_moe, windows
from worker.gptq.arch import get_arch
from worker.gptq.config import QuantizeConfig
from worker.gptq.evaluate import agreement, rtn_quantize_model, window_perplexity
from worker.gptq.pipeline import quantize_model

SPEC = MoeSpec()
# 3-bit: at 4 bits this small model barely moves under RTN (8.21 vs 8.23 full precision), so
# 4-bit differences are noise; bench/moe_quality.py has the whole table
CONFIG = QuantizeConfig(bits=3, group_size=32)
CALIBRATION_WINDOWS = 32


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(trained_moe(SPEC), dtype=torch.float32).eval()


@pytest.mark.slow
@pytest.mark.fixtures
def test_gptq_quantizes_every_expert_and_beats_rtn(model) -> None:
    calib = windows(TRAIN_TEXT, SPEC.seq)[:CALIBRATION_WINDOWS]
    held_out = windows(HELD_OUT_TEXT, SPEC.seq)
    gptq = copy.deepcopy(model)
    result = quantize_model(gptq, calib, CONFIG, device="cpu")

    expected = {f"model.layers.{b}.mlp.experts.{e}.{p}" for b in range(SPEC.layers)
                for e in range(SPEC.experts) for p in ("gate_proj", "up_proj", "down_proj")}
    assert expected <= set(result.layers)  # every routed expert, by GPTQ (no RTN, no fp16)
    assert len(result.layers) == SPEC.layers * len(get_arch(gptq).module_names)
    for report in result.modules:
        if ".experts." in report.module:
            # each expert's Hessian saw every calibration token; the router sent it fewer
            assert report.nsamples == calib.numel()
            assert report.routed_tokens is not None and 0 <= report.routed_tokens < calib.numel()
        else:
            assert report.routed_tokens is None
    for block in range(1, SPEC.layers + 1):
        routed = [m.routed_tokens for m in result.modules
                  if m.block == block and m.module.endswith(".gate_proj")]
        assert len(routed) == SPEC.experts and sum(routed) == calib.numel() * SPEC.top_k
        assert min(routed) > 0  # load-balanced training: no expert is dead here

    rtn = copy.deepcopy(model)
    rtn_quantize_model(rtn, CONFIG)
    ppl_gptq, ppl_rtn = window_perplexity(gptq, held_out), window_perplexity(rtn, held_out)
    assert ppl_gptq < ppl_rtn, (window_perplexity(model, held_out), ppl_gptq, ppl_rtn)
    # the margin on KL to the original, the finer measure: the model is trained where the test
    # runs, and its perplexities move with the CPU's float arithmetic (GPTQ's share of RTN's
    # perplexity loss measured 0.37 on one machine, under 0.25 on another) where the KL ratio
    # stays near 0.43
    kl_gptq, kl_rtn = agreement(model, gptq, held_out)["kl"], agreement(model, rtn, held_out)["kl"]
    assert kl_gptq < 0.65 * kl_rtn, (kl_gptq, kl_rtn)
