"""Per-layer settings (GPTQModel's `dynamic` rules): which rule decides a layer, and what the
engine refuses before any work."""

from __future__ import annotations

import pytest

from worker.gptq.config import QuantizeConfig
from worker.gptq.module_rules import unmatched_rules
from worker.gptq.pipeline import same_settings

RULES = {
    r"-:model\.layers\.0\.": {},
    r"+:.*\.mlp\.down_proj": {"bits": 8},
    r".*down_proj": {"bits": 2},  # never decides: the rule above matches every down_proj first
    r".*\.k_proj": {"group_size": 32, "desc_act": True},
}


def test_the_first_matching_rule_decides() -> None:
    config = QuantizeConfig(bits=4, group_size=128, dynamic=RULES)
    assert config.for_module("model.layers.0.mlp.down_proj") is None  # skipped before any override
    assert config.for_module("model.layers.5.mlp.down_proj").bits == 8
    k = config.for_module("model.layers.5.self_attn.k_proj")
    assert (k.bits, k.group_size, k.desc_act, k.act_group_aware) == (4, 32, True, False)
    assert k.dynamic == {}  # a layer's own settings carry no rules
    assert config.for_module("model.layers.5.self_attn.q_proj") is config
    # re.match, as GPTQModel and vLLM match: from the start of the name, not anywhere in it
    assert QuantizeConfig(dynamic={r"layers\.5": {"bits": 8}}).for_module("model.layers.5.mlp.up_proj").bits == 4


def test_rules_that_decide_nothing_are_found() -> None:
    names = [f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.k_proj", "mlp.down_proj")]
    assert unmatched_rules(RULES, names) == [r".*down_proj"]


def test_quantized_with_refuses_a_skipped_layer() -> None:
    config = QuantizeConfig(dynamic=RULES)
    with pytest.raises(ValueError, match="leaves it unquantized"):
        config.quantized_with("model.layers.0.self_attn.q_proj")


@pytest.mark.parametrize(("rules", "says"), [
    ({"x": {"bits": 5}}, "dynamic rule 'x': bits must be one of"),
    ({"-:x": {"bits": 8}}, "takes no settings"),
    ({"x": {"sym": False}}, "may set only"),
])
def test_the_engine_refuses_bad_rules(rules: dict, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        QuantizeConfig(dynamic=rules)


def test_layers_sharing_inputs_are_solved_together_only_with_one_setting() -> None:
    base = QuantizeConfig()
    k = QuantizeConfig(bits=3)
    settings = {"q_proj": base, "k_proj": k, "v_proj": base}
    assert same_settings(["q_proj", "k_proj", "v_proj"], settings) == [["q_proj", "v_proj"], ["k_proj"]]
    assert same_settings(["q_proj", "v_proj"], settings) == [["q_proj", "v_proj"]]


def test_our_loader_reads_a_layers_rule_and_refuses_unreadable_rules() -> None:
    from worker.gptq.errors import InvalidCheckpoint
    from worker.gptq.loader import module_settings

    qconfig = {"bits": 4, "group_size": 128, "dynamic": {r"+:.*down_proj": {"bits": 8, "group_size": 32}}}
    assert module_settings(qconfig, "model.layers.0.mlp.down_proj", 4) == (8, 32)
    assert module_settings(qconfig, "model.layers.0.mlp.up_proj", 4) == (4, 128)
    for rules in ({"+:(": {}}, {".*": {"bits": 5}}):
        with pytest.raises(InvalidCheckpoint):
            module_settings({"bits": 4, "dynamic": rules}, "model.layers.0.mlp.up_proj", 4)
