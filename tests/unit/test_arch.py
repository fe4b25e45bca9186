"""Architecture specs: which families are supported, where their linears are, shape refusals."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf
from torch import nn
from transformers.pytorch_utils import Conv1D

from tests.conftest import fixture_path
from worker.gptq.arch import (
    SUPPORTED_MODEL_TYPES,
    get_arch,
    get_weight,
    is_linear,
    linear_shape,
    set_weight,
    validate_layers,
)
from worker.gptq.config import QuantizeConfig
from worker.gptq.errors import LayerShapeError, UnsupportedArchitecture
from worker.gptq.modelio import skeleton

LLAMA_LIKE = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=128,
)
CONFIGS = {
    "llama": lambda: tf.LlamaConfig(**LLAMA_LIKE),
    "mistral": lambda: tf.MistralConfig(**LLAMA_LIKE),
    "qwen2": lambda: tf.Qwen2Config(**LLAMA_LIKE),
    "qwen3": lambda: tf.Qwen3Config(**LLAMA_LIKE, head_dim=16),
    "gpt2": lambda: tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128),
    "opt": lambda: tf.OPTConfig(
        hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
        word_embed_proj_dim=64, vocab_size=128,
    ),
    "gpt_neox": lambda: tf.GPTNeoXConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        vocab_size=128,
    ),
}
FAMILY = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama",
          "gpt2": "gpt2", "opt": "opt", "gpt_neox": "gpt_neox"}


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_every_linear_of_every_block_is_in_the_spec(model_type: str) -> None:
    config = CONFIGS[model_type]()
    arch = get_arch(config)
    assert arch.family == FAMILY[model_type]
    model = skeleton(config)
    assert get_arch(model) is arch
    blocks = arch.blocks(model)
    assert len(blocks) == 2
    for index, block in enumerate(blocks):
        in_block = {name for name, module in block.named_modules() if is_linear(module)}
        assert set(arch.block_linears(block, index)) == in_block
        assert len(arch.module_names) == len(in_block)  # each exactly once
    names = validate_layers(model, arch, QuantizeConfig(bits=4, group_size=32))
    assert names[0] == f"{arch.blocks_path}.0.{arch.sequential[0][0]}"
    assert len(names) == 2 * len(arch.module_names)
    # the output head and embeddings are not among the quantized layers
    assert not any("lm_head" in n or "embed" in n or n.endswith("wte") for n in names)


def test_true_sequential_order_puts_in_projections_first() -> None:
    arch = get_arch("llama")
    assert arch.sequential == (
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    )
    assert arch.groups(true_sequential=False) == (arch.module_names,)


@pytest.mark.parametrize("model_type", ["bert", "t5", "deepseek_v3", None])
def test_unsupported_type_is_refused_naming_it_and_the_supported_ones(model_type) -> None:
    with pytest.raises(UnsupportedArchitecture) as info:
        get_arch({"model_type": model_type})
    message = str(info.value)
    assert repr(model_type) in message
    for supported in SUPPORTED_MODEL_TYPES:
        assert supported in message
    assert info.value.code == "unsupported_architecture"


def test_a_model_missing_a_layer_of_its_family_is_refused() -> None:
    model = skeleton(CONFIGS["llama"]())
    arch = get_arch(model)
    del model.model.layers[1].mlp.down_proj
    with pytest.raises(UnsupportedArchitecture, match=r"model\.layers\.1 has no linear layer 'mlp\.down_proj'"):
        validate_layers(model, arch, QuantizeConfig())


def test_stories260k_is_refused_before_any_work_naming_its_layers() -> None:
    config_file = fixture_path("models", "stories260k", "config.json")
    config = tf.LlamaConfig(**json.loads(config_file.read_text()))
    model = skeleton(config)  # meta device: shapes only
    with pytest.raises(LayerShapeError) as info:
        validate_layers(model, get_arch(config), QuantizeConfig(bits=4, group_size=32))
    message = str(info.value)
    assert "model.layers.0.mlp.gate_proj [out 172, in 64]" in message
    assert "out_features 172 is not a multiple of 8" in message
    assert "model.layers.0.mlp.down_proj [out 64, in 172]" in message
    assert "in_features 172 is not divisible by group_size 32" in message
    assert "15 of 35 layers" in message
    assert "self_attn" not in message  # the 64x64 attention layers fit
    # what would work instead: 172 = 4 x 43 packs only at 8 bits, in one group per row
    assert "no group size fits every layer at 4 bits" in message
    assert "bits that do, with group_size -1: 8" in message


def test_a_group_size_that_does_not_divide_names_those_that_would() -> None:
    config = CONFIGS["gpt_neox"]()
    model = skeleton(config)
    model.gpt_neox.layers[1].mlp.dense_4h_to_h = nn.Linear(96, 64, device="meta")
    with pytest.raises(LayerShapeError) as info:
        validate_layers(model, get_arch(config), QuantizeConfig(bits=4, group_size=64))
    widths = {i for o, i in [(m.out_features, m.in_features) for m in model.modules()
                             if isinstance(m, nn.Linear)]}
    fits = [g for g in (16, 32, 64, 128) if all(w % g == 0 for w in widths)]
    assert f"group sizes that fit every layer at 4 bits: {', '.join(map(str, fits))}" in str(
        info.value)
    assert "-1 (one group per row)" in str(info.value)


@pytest.mark.parametrize(
    ("bits", "group_size", "out_features", "in_features", "reason"),
    [
        (4, 64, 64, 96, "in_features 96 is not divisible by group_size 64"),
        (3, -1, 48, 64, "out_features 48 is not a multiple of 32"),
        (3, -1, 64, 48, "in_features 48 is not a multiple of 32"),
        (8, -1, 64, 66, "in_features 66 is not a multiple of 4"),
        (2, 16, 40, 64, "out_features 40 is not a multiple of 16"),
    ],
)
def test_shapes_that_do_not_pack_are_refused(bits, group_size, out_features, in_features, reason) -> None:
    config = CONFIGS["gpt_neox"]()
    model = skeleton(config)
    model.gpt_neox.layers[1].mlp.dense_4h_to_h = nn.Linear(in_features, out_features, device="meta")
    with pytest.raises(LayerShapeError, match=r"gpt_neox\.layers\.1\.mlp\.dense_4h_to_h") as info:
        validate_layers(model, get_arch(config), QuantizeConfig(bits=bits, group_size=group_size))
    assert reason in str(info.value)
    assert "layers.0" not in str(info.value)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_sizes_that_fill_whole_words_pass(bits: int) -> None:
    config = CONFIGS["llama"]()
    names = validate_layers(skeleton(config), get_arch(config), QuantizeConfig(bits=bits, group_size=-1))
    assert len(names) == 14


def test_conv1d_weight_is_read_and_written_in_linear_orientation() -> None:
    torch.manual_seed(0)
    conv = Conv1D(nf=48, nx=32)  # 32 inputs, 48 outputs, weight stored [32, 48]
    assert linear_shape(conv) == (48, 32)
    weight = get_weight(conv)
    assert weight.shape == (48, 32)
    x = torch.randn(5, 32)
    torch.testing.assert_close(conv(x), x @ weight.t() + conv.bias)
    new = torch.randn(48, 32)
    set_weight(conv, new)
    torch.testing.assert_close(conv(x), x @ new.t() + conv.bias)
    weight[0, 0] = 123.0  # get_weight returns a copy
    assert conv.weight[0, 0] != 123.0


def test_set_weight_keeps_the_module_dtype_and_refuses_a_wrong_shape() -> None:
    linear = nn.Linear(32, 16, dtype=torch.float16)
    set_weight(linear, torch.ones(16, 32))
    assert linear.weight.dtype == torch.float16
    assert bool((linear.weight == 1).all())
    with pytest.raises(ValueError, match="does not fit"):
        set_weight(linear, torch.ones(32, 16))
