"""bench/flops.py's counter, which bench/gpu.sh's FLOP rates rest on: it must see every
Hessian accumulation, solve and linear call of a run, by the formulas it states."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from tests.tiny_models import tiny_model
from worker.gptq.config import QuantizeConfig
from worker.gptq.pipeline import quantize_model

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from flops import counted


def test_counted_sees_every_hessian_solve_and_linear_call() -> None:
    model = tiny_model("llama")
    c = model.config
    h, i, layers = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    kv = c.num_key_value_heads * (h // c.num_attention_heads)
    calib = torch.randint(0, c.vocab_size, (4, 32))
    T = calib.numel()
    with counted() as flops:
        quantize_model(model, calib, QuantizeConfig(bits=4, group_size=32), device="cpu")

    # one XᵀX per input: q/k/v's, o's, gate/up's (K = h) and down's (K = i)
    assert flops["hessian"] == layers * 2.0 * T * (3 * h**2 + i**2)
    # one problem per shared input: q/k/v stacked, o, gate/up stacked, down
    problems = [(h + 2 * kv, h), (h, h), (2 * i, h), (h, i)]
    assert flops["solve"] == layers * sum(n * k**2 + 4.0 / 3.0 * k**3 for n, k in problems)
    # every linear's product runs at least once over all tokens (the passes that stop early
    # or replay a finished attention run some of them more than once, never fewer)
    once = 2.0 * T * (h * (h + 2 * kv) + h * h + 3 * h * i)
    assert layers * once <= flops["forward"] <= layers * 3 * once
    # and the counter is gone afterwards
    before = dict(flops)
    quantize_model(tiny_model("llama"), calib, QuantizeConfig(bits=4, group_size=32), device="cpu")
    assert flops == before


def test_counted_sees_gpt2s_conv1d_layers() -> None:
    """GPT-2's layers are Conv1D ([in, out] weights), not nn.Linear: counted too."""
    model = tiny_model("gpt2")
    c = model.config
    h, inner = c.n_embd, c.n_inner or 4 * c.n_embd
    calib = torch.randint(0, c.vocab_size, (4, 32))
    T = calib.numel()
    with counted() as flops:
        quantize_model(model, calib, QuantizeConfig(bits=4, group_size=32), device="cpu")
    # c_attn (h -> 3h), c_proj (h -> h), c_fc (h -> inner), mlp.c_proj (inner -> h)
    once = 2.0 * T * (3 * h * h + h * h + 2 * h * inner)
    assert c.n_layer * once <= flops["forward"] <= c.n_layer * 3 * once
