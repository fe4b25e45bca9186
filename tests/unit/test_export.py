"""The checkpoint writer: config keys, zero-point storage, g_idx, dtypes, tied weights, shards."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from worker.gptq import __version__
from worker.gptq.arch import get_arch
from worker.gptq.config import QuantizeConfig
from worker.gptq.errors import EngineError
from worker.gptq.evaluate import rtn_quantize_model
from worker.gptq.export import (
    INDEX_NAME,
    partial_dir,
    publish_atomically,
    quantization_config_dict,
    save_checkpoint,
)
from worker.gptq.gptq import GPTQ
from worker.gptq.loader import load_quantized, read_tensors

EXPECTED_KEYS = {
    "quant_method", "method", "bits", "group_size", "desc_act", "sym", "lm_head",
    "checkpoint_format", "format", "damp_percent", "damp_auto_increment", "true_sequential",
    "static_groups", "pack_dtype", "meta",
}
EXPECTED_META_KEYS = {
    "quantizer", "uri", "damp_percent", "damp_auto_increment", "static_groups", "true_sequential", "mse",
    "act_group_aware",
}
Q_PROJ = "model.layers.0.self_attn.q_proj"


def tiny_llama(tied: bool = True) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=96, n_embd=64, n_layer=1, n_head=4, n_positions=64,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def export(model, config: QuantizeConfig, out: Path, **kwargs) -> dict[str, torch.Tensor]:
    result = rtn_quantize_model(model, config)
    save_checkpoint(model, None, result, config, out, **kwargs)
    return read_tensors(out)


def fields(word: int, bits: int) -> list[int]:
    """The bits-wide fields of one int32 word, lowest first (2/4/8 bits)."""
    word &= 0xFFFFFFFF
    return [(word >> (i * bits)) & (2**bits - 1) for i in range(32 // bits)]


def test_quantization_config_has_exactly_the_ecosystem_keys():
    config = QuantizeConfig(bits=3, group_size=64, desc_act=True, sym=False, mse=True)
    qc = quantization_config_dict(config)
    assert set(qc) == EXPECTED_KEYS
    assert set(qc["meta"]) == EXPECTED_META_KEYS
    assert qc["quant_method"] == "gptq" and qc["pack_dtype"] == "int32" and qc["lm_head"] is False
    assert (qc["bits"], qc["group_size"], qc["desc_act"], qc["sym"]) == (3, 64, True, False)
    assert qc["checkpoint_format"] == qc["format"] == "gptq_v2"
    assert qc["meta"]["quantizer"] == [f"gptqd:{__version__}"]
    assert qc["meta"]["mse"] is True
    assert quantization_config_dict(QuantizeConfig())["checkpoint_format"] == "gptq"


def test_config_files_carry_the_same_dict_and_fp16(tmp_path):
    config = QuantizeConfig(bits=4, group_size=32)
    export(tiny_llama(), config, tmp_path)
    model_config = json.loads((tmp_path / "config.json").read_text())
    quantize_config = json.loads((tmp_path / "quantize_config.json").read_text())
    assert model_config["quantization_config"] == quantize_config == quantization_config_dict(config)
    assert model_config["dtype"] == model_config["torch_dtype"] == "float16"
    assert model_config["model_type"] == "llama"
    for name in ("generation_config.json", "quant_report.json", "quant_log.csv", "model.safetensors"):
        assert (tmp_path / name).is_file(), name
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_tensors_shapes_dtypes_and_tied_lm_head_omitted(tmp_path):
    tensors = export(tiny_llama(tied=True), QuantizeConfig(bits=4, group_size=32), tmp_path)
    K, N = 64, 64
    assert tensors[f"{Q_PROJ}.qweight"].dtype == torch.int32
    assert tensors[f"{Q_PROJ}.qweight"].shape == (K * 4 // 32, N)
    assert tensors[f"{Q_PROJ}.qzeros"].shape == (K // 32, N * 4 // 32)
    assert tensors[f"{Q_PROJ}.scales"].shape == (K // 32, N)
    assert tensors[f"{Q_PROJ}.scales"].dtype == torch.float16
    assert tensors[f"{Q_PROJ}.g_idx"].dtype == torch.int32
    assert f"{Q_PROJ}.weight" not in tensors
    assert "lm_head.weight" not in tensors  # tied to the embeddings, written once
    assert tensors["model.embed_tokens.weight"].dtype == torch.float16
    assert tensors["model.norm.weight"].dtype == torch.float16
    down = tensors["model.layers.0.mlp.down_proj.qweight"]
    assert down.shape == (128 * 4 // 32, 64)


def test_untied_lm_head_is_written_unquantized(tmp_path):
    tensors = export(tiny_llama(tied=False), QuantizeConfig(bits=4, group_size=32), tmp_path)
    assert tensors["lm_head.weight"].dtype == torch.float16
    assert "lm_head.qweight" not in tensors


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_symmetric_v1_stores_zero_minus_one(tmp_path, bits):
    tensors = export(tiny_llama(), QuantizeConfig(bits=bits, group_size=32), tmp_path)
    qzeros = tensors[f"{Q_PROJ}.qzeros"]
    assert set(fields(int(qzeros[0, 0]), bits)) == {2 ** (bits - 1) - 1}
    if bits == 4:
        assert torch.all(qzeros == 0x77777777)


def test_asymmetric_v2_stores_true_zeros(tmp_path):
    model = tiny_llama()
    config = QuantizeConfig(bits=4, group_size=32, sym=False)
    result = rtn_quantize_model(model, config)
    save_checkpoint(model, None, result, config, tmp_path)
    qzeros = read_tensors(tmp_path)[f"{Q_PROJ}.qzeros"]
    true_zeros = result.layers[Q_PROJ].zeros  # [G, N]
    for g in range(true_zeros.shape[0]):
        stored = [z for word in qzeros[g].tolist() for z in fields(word, 4)]
        assert stored == true_zeros[g].tolist()
    assert (true_zeros == 0).any() or (true_zeros != 8).any()  # asym zeros really vary


def test_trivial_g_idx_without_act_order(tmp_path):
    tensors = export(tiny_llama(), QuantizeConfig(bits=4, group_size=32), tmp_path)
    assert torch.equal(tensors[f"{Q_PROJ}.g_idx"], torch.arange(64, dtype=torch.int32) // 32)
    channel = export(tiny_llama(), QuantizeConfig(bits=4, group_size=-1), tmp_path / "pc")
    assert torch.equal(channel[f"{Q_PROJ}.g_idx"], torch.zeros(64, dtype=torch.int32))


def _act_order_result(model, config):
    """RTN everywhere except q_proj, which GPTQ solves with act-order on uneven inputs."""
    result = rtn_quantize_model(model, replace(config, desc_act=False))
    layer = model.get_submodule(Q_PROJ)
    solver = GPTQ(layer.weight.detach())
    gen = torch.Generator().manual_seed(1)
    solver.add_batch(torch.randn(256, 64, generator=gen) * torch.linspace(0.1, 3.0, 64))
    result.layers[Q_PROJ] = solver.solve(config)
    return result


def test_act_order_g_idx_is_the_solvers(tmp_path):
    model = tiny_llama()
    config = QuantizeConfig(bits=4, group_size=32, desc_act=True)
    result = _act_order_result(model, config)
    save_checkpoint(model, None, result, config, tmp_path)
    g_idx = read_tensors(tmp_path)[f"{Q_PROJ}.g_idx"]
    assert torch.equal(g_idx, result.layers[Q_PROJ].g_idx)
    assert not torch.equal(g_idx, torch.arange(64, dtype=torch.int32) // 32)


def test_non_trivial_g_idx_without_act_order_is_refused(tmp_path):
    model = tiny_llama()
    result = _act_order_result(model, QuantizeConfig(bits=4, group_size=32, desc_act=True))
    with pytest.raises(EngineError, match="non-trivial g_idx"):
        save_checkpoint(model, None, result, QuantizeConfig(bits=4, group_size=32), tmp_path)


def test_gpt2_conv1d_layers_and_bias(tmp_path):
    model = tiny_gpt2()
    tensors = export(model, QuantizeConfig(bits=4, group_size=32), tmp_path)
    name = "transformer.h.0.attn.c_attn"  # Conv1D, weight [64 in, 192 out]
    assert tensors[f"{name}.qweight"].shape == (64 * 4 // 32, 192)
    assert tensors[f"{name}.bias"].dtype == torch.float16
    assert torch.equal(tensors[f"{name}.bias"], model.get_submodule(name).bias.detach().half())
    assert "lm_head.weight" not in tensors


def test_small_max_shard_size_writes_shards_and_index(tmp_path):
    model = tiny_llama()
    config = QuantizeConfig(bits=4, group_size=32)
    result = rtn_quantize_model(model, config)
    paths = save_checkpoint(model, None, result, config, tmp_path, max_shard_size=8_000)
    shards = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and not (tmp_path / "model.safetensors").exists()
    assert tmp_path / INDEX_NAME in paths
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    stored: dict[str, str] = {}
    total = 0
    for shard in shards:
        with safe_open(str(shard), "pt") as f:
            for key in f.keys():  # noqa: SIM118
                stored[key] = shard.name
                t = f.get_tensor(key)
                total += t.numel() * t.element_size()
    assert index["weight_map"] == stored
    assert index["metadata"]["total_size"] == total
    reloaded, _ = load_quantized(tmp_path)
    assert torch.equal(reloaded.get_submodule(Q_PROJ).weight, result.layers[Q_PROJ].weight)


def test_publish_atomically(tmp_path):
    final = tmp_path / "ckpt"
    tmp = partial_dir(final)
    assert tmp.name == "ckpt.partial"
    tmp.mkdir()
    (tmp / "a").write_text("new")
    publish_atomically(tmp, final)
    assert (final / "a").read_text() == "new" and not tmp.exists()
    tmp.mkdir()
    (tmp / "b").write_text("newer")
    with pytest.raises(FileExistsError):
        publish_atomically(tmp, final)
    publish_atomically(tmp, final, overwrite=True)
    assert (final / "b").is_file() and not (final / "a").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_layers_left_unquantized_are_listed_in_dynamic(tmp_path):
    model = tiny_llama()
    config = QuantizeConfig(bits=4, group_size=32)
    result = rtn_quantize_model(model, config)
    skipped = "model.layers.0.mlp.down_proj"
    del result.layers[skipped]
    save_checkpoint(model, None, result, config, tmp_path, arch=get_arch(model))
    qconfig = json.loads((tmp_path / "quantize_config.json").read_text())
    assert qconfig["dynamic"] == {r"-:^model\.layers\.0\.mlp\.down_proj$": {}}
    tensors = read_tensors(tmp_path)
    assert tensors[f"{skipped}.weight"].dtype == torch.float16
    reloaded, _ = load_quantized(tmp_path)
    assert isinstance(reloaded.get_submodule(skipped), torch.nn.Linear)
    full = export(tiny_llama(), config, tmp_path / "all", arch=get_arch(model))
    assert "dynamic" not in json.loads((tmp_path / "all" / "quantize_config.json").read_text())
    assert f"{skipped}.qweight" in full


def test_layers_are_packed_on_the_device_they_were_solved_on() -> None:
    """Only the packed words, scales and g_idx are copied to the host, never the [N, K] codes
    (on a GPU those would be 8x the packed bytes at 4 bits). On the CPU the copies are no-ops,
    so the calls are recorded where they are made."""
    from torch.overrides import TorchFunctionMode

    from worker.gptq.arch import weight_view
    from worker.gptq.export import layer_tensors
    from worker.gptq.packing import pack_qweight, pack_qzeros

    moved: list[tuple[int, ...]] = []

    class HostCopies(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            to_host = func is torch.Tensor.cpu or (
                func is torch.Tensor.to and any(str(a) == "cpu" for a in [*args[1:], kwargs.get("device")]))
            if to_host:
                moved.append(tuple(args[0].shape))
            return func(*args, **kwargs)

    model = tiny_llama()
    config = QuantizeConfig(bits=4, group_size=32, desc_act=True)
    solver = GPTQ(weight_view(model.get_submodule(Q_PROJ)))
    solver.add_batch(torch.randn(256, 64))
    layer = solver.solve(config)
    with HostCopies():
        tensors = layer_tensors(model, Q_PROJ, layer, config)
    N, K = layer.codes.shape
    assert moved and (N, K) not in moved and (K, N) not in moved
    assert torch.equal(tensors[f"{Q_PROJ}.qweight"], pack_qweight(layer.codes, 4))
    assert torch.equal(tensors[f"{Q_PROJ}.qzeros"], pack_qzeros(layer.zeros, 4, "gptq"))
