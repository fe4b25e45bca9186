"""Per-layer settings (`dynamic` rules) through the engine's one entry point: the layers get
their own bits and groups, a skipped layer keeps its weight, a streamed run writes the same
checkpoint as a whole-model one, and a rule that decides nothing is refused before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.integration.checkpoints import assert_same_checkpoint, tiny_llama
from worker.gptq.api import quantize
from worker.gptq.config import CalibrationSpec, QuantizeConfig
from worker.gptq.errors import UnmatchedRule
from worker.gptq.loader import DequantLinear, load_quantized

CALIB = CalibrationSpec(num_samples=8, seq_length=64)
RULES = {
    r"-:model\.layers\.1\.self_attn\.o_proj$": {},
    r"+:.*\.mlp\.down_proj": {"bits": 8, "group_size": 32},
    r"+:.*\.self_attn\.k_proj": {"bits": 3, "damp_percent": 0.05},
}


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    found: dict[str, torch.Tensor] = {}
    for path in directory.glob("*.safetensors"):
        found.update(load_file(path))
    return found


@pytest.mark.slow
def test_each_layer_gets_its_rule_streamed_or_whole(tmp_path: Path) -> None:
    model = tiny_llama(tmp_path / "model", layers=3)
    config = QuantizeConfig(bits=4, group_size=64, dynamic=RULES)
    whole = quantize(str(model), tmp_path / "whole", config, CALIB, lazy=False)
    quantize(str(model), tmp_path / "streamed", config, CALIB, lazy=True)
    assert_same_checkpoint(tmp_path / "whole", tmp_path / "streamed")

    saved = tensors(tmp_path / "whole")
    # hidden 64, MLP 128: qweight packs K·bits/32 rows, one scale row per group
    assert saved["model.layers.2.mlp.down_proj.qweight"].shape == (128 * 8 // 32, 64)
    assert saved["model.layers.2.mlp.down_proj.scales"].shape == (128 // 32, 64)
    assert saved["model.layers.2.mlp.up_proj.qweight"].shape == (64 * 4 // 32, 128)
    assert saved["model.layers.2.self_attn.k_proj.qweight"].shape == (64 * 3 // 32, 32)
    # the skipped layer is the model's own weight, in fp16
    original = load_file(next((tmp_path / "model").glob("*.safetensors")))
    key = "model.layers.1.self_attn.o_proj.weight"
    assert torch.equal(saved[key], original[key].half())
    assert "model.layers.1.self_attn.o_proj.qweight" not in saved
    qconfig = json.loads((tmp_path / "whole" / "config.json").read_text())["quantization_config"]
    assert qconfig["dynamic"] == RULES and qconfig["bits"] == 4

    # the report says what each layer was solved with: k_proj alone at its own damping
    modules = {m["name"]: m for m in whole.to_dict()["modules"]}
    assert "model.layers.1.self_attn.o_proj" not in modules
    assert modules["model.layers.0.self_attn.k_proj"]["damp_percent"] == pytest.approx(0.05)
    assert modules["model.layers.0.self_attn.q_proj"]["damp_percent"] == pytest.approx(0.01)
    assert (modules["model.layers.0.mlp.down_proj"]["bits"], modules["model.layers.0.mlp.down_proj"]["group_size"]) == (8, 32)
    assert (modules["model.layers.0.mlp.up_proj"]["bits"], modules["model.layers.0.mlp.up_proj"]["group_size"]) == (4, 64)
    # 8-bit codes lose far less than 4-bit ones on the same layer
    four = quantize(str(model), tmp_path / "four", QuantizeConfig(bits=4, group_size=32), CALIB, lazy=False)
    plain = {m["name"]: m for m in four.to_dict()["modules"]}
    for i in range(3):
        name = f"model.layers.{i}.mlp.down_proj"
        assert modules[name]["loss"] < plain[name]["loss"] / 10, (name, modules[name], plain[name])

    loaded, _ = load_quantized(tmp_path / "whole")
    layers = dict(loaded.named_modules())
    assert layers["model.layers.0.mlp.down_proj"].bits == 8
    assert layers["model.layers.0.self_attn.k_proj"].bits == 3
    assert not isinstance(layers["model.layers.1.self_attn.o_proj"], DequantLinear)


def test_a_rule_that_decides_no_layer_is_refused_before_any_work(tmp_path: Path) -> None:
    model = tiny_llama(tmp_path / "model", layers=2)
    config = QuantizeConfig(bits=4, group_size=64, dynamic={
        r"+:.*\.mlp\.down_proj": {"bits": 8}, r"+:.*\.mlp\.gate_projj": {"bits": 8}})
    progress = []
    with pytest.raises(UnmatchedRule, match=r"gate_projj.*model\.layers\.0\.") as caught:
        quantize(str(model), tmp_path / "out", config, CALIB, progress=progress.append)
    named = str(caught.value).split(" decide ")[0]
    assert "gate_projj" in named and "down_proj" not in named  # only the rule that matched nothing
    assert not any(getattr(e, "stage", None) == "quantizing" for e in progress)
    assert not (tmp_path / "out").exists()


def test_a_rule_that_does_not_fit_a_layer_is_refused_naming_it(tmp_path: Path) -> None:
    """The shape check applies each layer's own settings: 128 inputs in groups of 256 cannot be."""
    model = tiny_llama(tmp_path / "model", layers=2)
    config = QuantizeConfig(bits=4, group_size=64, dynamic={r".*down_proj": {"group_size": 256}})
    with pytest.raises(Exception, match=r"down_proj.*group_size=256 by its rule"):
        quantize(str(model), tmp_path / "out", config, CALIB)


@pytest.mark.slow
def test_rules_reach_single_experts(tmp_path: Path) -> None:
    """An MoE's experts are layers of their own (unfused for the solve): a rule picks some of
    them out of the one stacked solve of a block's experts."""
    from tests.integration.checkpoints import saved_tiny_model

    model = saved_tiny_model("qwen2_moe", tmp_path / "model")
    rules = {r"+:.*\.experts\.0\.": {"bits": 8}, r"-:.*\.experts\.1\.down_proj$": {}}
    config = QuantizeConfig(bits=4, group_size=32, dynamic=rules)
    calib = CalibrationSpec(source="builtin", num_samples=4, seq_length=32)
    quantize(str(model), tmp_path / "whole", config, calib, lazy=False)
    quantize(str(model), tmp_path / "streamed", config, calib, lazy=True)
    assert_same_checkpoint(tmp_path / "whole", tmp_path / "streamed")
    saved = tensors(tmp_path / "whole")
    expert = "model.layers.0.mlp.experts"
    K = saved[f"{expert}.2.gate_proj.g_idx"].numel()
    assert saved[f"{expert}.0.gate_proj.qweight"].shape[0] == K * 8 // 32
    assert saved[f"{expert}.2.gate_proj.qweight"].shape[0] == K * 4 // 32
    assert f"{expert}.1.down_proj.weight" in saved and f"{expert}.1.down_proj.qweight" not in saved
    loaded, _ = load_quantized(tmp_path / "whole")
    assert loaded.get_submodule(f"{expert}.0.gate_proj").bits == 8


def test_a_rule_on_k_proj_leaves_q_and_v_as_they_were(tmp_path: Path) -> None:
    """q/k/v share one XᵀX: with a rule on k_proj they are solved in two parts, q and v still on
    the untouched XᵀX. In the first block (same inputs either way) they come out bit for bit as
    in a run without the rule."""
    model = tiny_llama(tmp_path / "model", layers=1)
    base = QuantizeConfig(bits=4, group_size=64)
    quantize(str(model), tmp_path / "plain", base, CALIB, lazy=False)
    ruled = QuantizeConfig(bits=4, group_size=64, dynamic={r".*k_proj": {"bits": 8}})
    quantize(str(model), tmp_path / "ruled", ruled, CALIB, lazy=False)
    plain, mixed = tensors(tmp_path / "plain"), tensors(tmp_path / "ruled")
    for layer in ("q_proj", "v_proj"):
        for part in ("qweight", "qzeros", "scales"):
            key = f"model.layers.0.self_attn.{layer}.{part}"
            assert torch.equal(plain[key], mixed[key]), key
    k = "model.layers.0.self_attn.k_proj.qweight"
    assert mixed[k].shape[0] == 2 * plain[k].shape[0]  # 8 bits against 4
