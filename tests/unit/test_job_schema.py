"""What a job spec keeps of its calibration source: only what applies to it."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from app.schemas import CalibrationIn, JobIn

DS = "ds_" + "0" * 32


@pytest.mark.parametrize(("given", "kept"), [
    ({}, {"dataset": "Salesforce/wikitext", "config": "wikitext-2-raw-v1", "split": "train"}),
    # its old name keeps its config too (the worker asks the hub for the id it redirects to)
    ({"dataset": "wikitext"}, {"dataset": "wikitext", "config": "wikitext-2-raw-v1"}),
    ({"dataset": "builtin"}, {"dataset": "builtin", "config": None, "split": None}),
    ({"dataset_id": DS}, {"dataset": None, "config": None, "split": None, "dataset_id": DS}),
    # another hub dataset does not inherit wikitext's config; one it is given is kept
    ({"dataset": "allenai/c4"}, {"dataset": "allenai/c4", "config": None, "split": "train"}),
    ({"dataset": "allenai/c4", "config": "en", "split": "validation"},
     {"dataset": "allenai/c4", "config": "en", "split": "validation"}),
])
def test_the_spec_echoes_only_what_applies(given: dict, kept: dict) -> None:
    spec = CalibrationIn.model_validate(given).model_dump()
    assert {k: spec[k] for k in kept} == kept


@pytest.mark.parametrize("field", ["dataset", "split"])
def test_a_client_cannot_null_what_a_hub_source_needs(field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        CalibrationIn.model_validate({field: None})


def test_json_types_are_taken_as_they_are() -> None:
    with pytest.raises(ValidationError, match="bits"):
        JobIn.model_validate_json('{"model_id": "m", "bits": "4"}')
    with pytest.raises(ValidationError, match="num_samples"):
        JobIn.model_validate_json('{"model_id": "m", "calibration": {"num_samples": "8"}}')
    assert JobIn.model_validate_json('{"model_id": "m", "damp_percent": 1e-2}').damp_percent == 0.01
    # a Literal of ints would take 4.0 (== 4) and true (== 1) even in strict mode
    for field, value in (("bits", "4.0"), ("group_size", "128.0"), ("bits", "true")):
        with pytest.raises(ValidationError, match=f"{field}[\\s\\S]*JSON integer"):
            JobIn.model_validate_json(f'{{"model_id": "m", "{field}": {value}}}')
    spec = JobIn.model_validate_json('{"model_id": "m", "bits": 3, "group_size": -1}')
    assert (spec.bits, spec.group_size) == (3, -1)


def test_group_aware_reordering_and_clipping_search_reach_the_engine() -> None:
    from worker.jobspec import quantize_config

    default = quantize_config(JobIn.model_validate({"model_id": "m"}).model_dump())
    assert default.act_group_aware is True and default.mse is True
    off = quantize_config(JobIn.model_validate(
        {"model_id": "m", "act_group_aware": False, "mse": False}).model_dump())
    assert off.act_group_aware is False and off.mse is False
    # with act-order the config records that it was not used
    assert quantize_config(JobIn.model_validate({"model_id": "m", "desc_act": True}).model_dump()).act_group_aware is False
    with pytest.raises(ValidationError, match="act_group_aware"):
        JobIn.model_validate_json('{"model_id": "m", "act_group_aware": "yes"}')
    # a spec stored before these fields existed runs with the engine's defaults
    stored = JobIn.model_validate({"model_id": "m"}).model_dump()
    del stored["act_group_aware"], stored["mse"]
    assert quantize_config(stored).act_group_aware is True


def test_tensor_names_reach_the_engine() -> None:
    from worker.jobspec import quantize_config

    assert quantize_config(JobIn.model_validate({"model_id": "m"}).model_dump()).tensor_names == "module"
    original = JobIn.model_validate({"model_id": "m", "tensor_names": "original"}).model_dump()
    assert quantize_config(original).tensor_names == "original"
    with pytest.raises(ValidationError, match="tensor_names"):
        JobIn.model_validate({"model_id": "m", "tensor_names": "vllm"})
    stored = JobIn.model_validate({"model_id": "m"}).model_dump()
    del stored["tensor_names"]  # a spec stored before the field existed
    assert quantize_config(stored).tensor_names == "module"


def test_per_layer_rules_reach_the_engine_as_given() -> None:
    from worker.jobspec import quantize_config

    body = {"model_id": "m", "bits": 4, "dynamic": {
        r"+:.*\.down_proj": {"bits": 8, "group_size": 32}, r"-:.*\.0\.self_attn\.o_proj": {}}}
    spec = JobIn.model_validate(body).model_dump(mode="json")
    # stored and echoed as sent: unset settings are the job's own, not nulls
    assert spec["dynamic"] == body["dynamic"]
    config = quantize_config(spec)
    assert config.for_module("model.layers.3.mlp.down_proj").bits == 8
    assert config.for_module("model.layers.3.mlp.down_proj").group_size == 32
    assert config.for_module("model.layers.3.mlp.up_proj") is config
    assert config.for_module("model.layers.0.self_attn.o_proj") is None
    assert JobIn.model_validate({"model_id": "m"}).model_dump()["dynamic"] is None


@pytest.mark.parametrize(("rules", "says"), [
    ({"+:(": {"bits": 8}}, "not a valid regex"),
    ({"-:.*o_proj": {"bits": 8}}, "takes no settings"),
    ({".*o_proj": {"sym": False}}, "may set only bits, group_size, desc_act, damp_percent"),
    ({"+:": {"bits": 8}}, "empty regex"),
    ({".*o_proj": {"bits": 5}}, "bits"),
    ({".*o_proj": {"group_size": 100}}, "group_size"),
    ({".*o_proj": {"damp_percent": 1.5}}, "damp_percent"),
    ({".*o_proj": {"bits": "8"}}, "bits"),
    ({".*o_proj": 8}, "must map to an object"),
    ({f"+:layer{i}": {} for i in range(65)}, "at most 64 rules"),
])
def test_a_bad_rule_is_refused_saying_why(rules: dict, says: str) -> None:
    with pytest.raises(ValidationError) as caught:
        JobIn.model_validate({"model_id": "m", "dynamic": rules})
    assert says in str(caught.value)
    assert "dynamic" in str(caught.value)


def test_rules_need_module_names() -> None:
    with pytest.raises(ValidationError, match="tensor_names 'module'"):
        JobIn.model_validate({"model_id": "m", "tensor_names": "original", "dynamic": {".*": {"bits": 8}}})
