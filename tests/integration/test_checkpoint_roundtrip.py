"""Quantize tiny models with the real pipeline, save, reload with the loader: nothing may change.

The loader's dequantized weights must equal the solver's bit for bit, and the reloaded model's
logits must match the in-memory quantized model's. The checkpoint stores non-quantized
tensors (and biases) in fp16, so the in-memory reference gets the same fp16 rounding first.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from worker.gptq.arch import get_arch, get_weight
from worker.gptq.config import QuantizeConfig
from worker.gptq.export import save_checkpoint
from worker.gptq.loader import DequantLinear, load_quantized
from worker.gptq.pipeline import quantize_model

VOCAB = 96


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def calibration_ids(samples: int = 8, length: int = 32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (samples, length), generator=gen)


def fp16_rounded_reference(model: torch.nn.Module, quantized: set[str]) -> None:
    """Round what the checkpoint stores in fp16 (everything but quantized weights), in place."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.removesuffix(".weight") not in quantized or name.endswith(".bias"):
                param.copy_(param.half().float())


def roundtrip(model: torch.nn.Module, config: QuantizeConfig, out) -> tuple[torch.nn.Module, dict]:
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = quantize_model(model, calibration_ids(), config, device="cpu")
    save_checkpoint(model, None, result, config, out)
    reloaded, tokenizer = load_quantized(out)
    assert tokenizer is None
    for name, layer in result.layers.items():
        module = reloaded.get_submodule(name)
        assert isinstance(module, DequantLinear)
        assert torch.equal(module.weight, layer.weight), name  # loader == solver, exactly
        assert torch.equal(get_weight(model.get_submodule(name)), layer.weight), name
        assert not torch.equal(module.weight, get_weight_from(original, name, model)), name
    fp16_rounded_reference(model, set(result.layers))
    ids = calibration_ids(2, 24)
    with torch.no_grad():
        expected, got = model(ids).logits, reloaded(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    return reloaded, result.layers


def get_weight_from(params: dict[str, torch.Tensor], name: str, model: torch.nn.Module) -> torch.Tensor:
    weight = params[f"{name}.weight"]
    return weight if isinstance(model.get_submodule(name), torch.nn.Linear) else weight.t()


@pytest.mark.parametrize("desc_act", [False, True], ids=["no-act", "act"])
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_llama_roundtrip(tmp_path, bits, sym, desc_act):
    config = QuantizeConfig(bits=bits, group_size=32, sym=sym, desc_act=desc_act)
    reloaded, layers = roundtrip(tiny_llama(), config, tmp_path)
    assert len(layers) == 2 * 7
    qconfig = json.loads((tmp_path / "quantize_config.json").read_text())
    assert qconfig["checkpoint_format"] == ("gptq" if sym else "gptq_v2")
    assert reloaded.get_submodule("model.layers.1.mlp.down_proj").checkpoint_format == qconfig["format"]


def test_the_generation_settings_come_back(tmp_path):
    """A verification's samples are generated as the original model's were."""
    model = tiny_llama()
    model.generation_config.no_repeat_ngram_size = 3
    reloaded, _ = roundtrip(model, QuantizeConfig(bits=4, group_size=32), tmp_path)
    assert reloaded.generation_config.no_repeat_ngram_size == 3


@pytest.mark.parametrize(
    "config",
    [
        QuantizeConfig(bits=4, group_size=128),
        QuantizeConfig(bits=4, group_size=-1, desc_act=True),
        QuantizeConfig(bits=3, group_size=32, sym=False, desc_act=True),
        QuantizeConfig(bits=4, group_size=32, desc_act=True, static_groups=True),
    ],
    ids=["llama-4b-g128", "llama-4b-channel-act", "llama-3b-asym-act", "llama-4b-static"],
)
def test_llama_group_settings_roundtrip(tmp_path, config):
    roundtrip(tiny_llama(), config, tmp_path)


@pytest.mark.parametrize(
    "config",
    [
        QuantizeConfig(bits=4, group_size=32),
        QuantizeConfig(bits=3, group_size=32, sym=False, desc_act=True),
        QuantizeConfig(bits=8, group_size=-1),
        QuantizeConfig(bits=2, group_size=64, desc_act=True, static_groups=True),
    ],
    ids=["4b-g32", "3b-asym-act", "8b-channel", "2b-static"],
)
def test_gpt2_conv1d_roundtrip(tmp_path, config):
    reloaded, layers = roundtrip(tiny_gpt2(), config, tmp_path)
    assert "transformer.h.1.attn.c_attn" in layers
    # tied lm_head is rebuilt from the embeddings
    assert reloaded.lm_head.weight.data_ptr() == reloaded.transformer.wte.weight.data_ptr()


def _nibbles_along_rows(values: torch.Tensor) -> torch.Tensor:
    """4-bit values [R, C] -> int32 [R/8, C], the way AutoGPTQ's packer does it (written here)."""
    rows, cols = values.shape
    out = torch.zeros(rows // 8, cols, dtype=torch.int64)
    for j in range(8):
        out |= values[j::8].to(torch.int64) << (4 * j)
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


def test_reads_a_foreign_v1_checkpoint(tmp_path):
    """AutoGPTQ layout: quantize_config.json only, no g_idx, old file name; v1 zeros."""
    model = tiny_llama()
    name = "model.layers.0.mlp.up_proj"  # 64 in, 128 out
    gen = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 16, (128, 64), generator=gen)  # [N, K]
    zeros = torch.randint(1, 16, (2, 128), generator=gen)  # [G, N], group 32
    scales = (torch.rand(2, 128, generator=gen) * 0.01 + 0.001).half()
    tensors = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}
    del tensors[f"{name}.weight"]
    tensors[f"{name}.qweight"] = _nibbles_along_rows(codes.t())
    tensors[f"{name}.qzeros"] = _nibbles_along_rows((zeros - 1).t()).t().contiguous()
    tensors[f"{name}.scales"] = scales
    save_file(tensors, tmp_path / "gptq_model-4bit-32g.safetensors")
    model.config.save_pretrained(tmp_path)
    (tmp_path / "quantize_config.json").write_text(json.dumps(
        {"bits": 4, "group_size": 32, "desc_act": False, "sym": False, "quant_method": "gptq",
         "model_file_base_name": "gptq_model-4bit-32g"}
    ))
    reloaded, _ = load_quantized(tmp_path)
    group = torch.arange(64) // 32
    expected = scales.float()[group].t() * (codes - zeros[group].t()).float()
    assert torch.equal(reloaded.get_submodule(name).weight, expected)
    assert isinstance(reloaded.get_submodule("model.layers.0.mlp.down_proj"), torch.nn.Linear)


@pytest.mark.parametrize("model_type", ["mistral", "qwen2", "qwen3", "opt", "gpt_neox"])
def test_every_family_roundtrips(tmp_path, model_type):
    # the same tiny configs the pipeline tests use, one per supported family
    from tests.tiny_models import tiny_model

    model = tiny_model(model_type)
    config = QuantizeConfig(bits=4, group_size=32, desc_act=True)
    _, layers = roundtrip(model, config, tmp_path)
    assert len(layers) == 2 * len(get_arch(model).module_names)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == model_type and saved["quantization_config"]["desc_act"] is True
