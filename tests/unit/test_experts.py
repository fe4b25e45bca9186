"""Routed experts split into one linear per expert (worker/gptq/experts.py) and their solve
groups (arch.MoeLayout)."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from tests.tiny_models import MOE_CONFIGS, VOCAB, tiny_model
from worker.gptq.arch import get_arch
from worker.gptq.errors import UnsupportedArchitecture
from worker.gptq.experts import (
    ExpertLinears,
    calibrating,
    expert_modules,
    reset_counts,
    unfuse_experts,
)


@pytest.mark.parametrize("model_type", sorted(MOE_CONFIGS))
def test_split_experts_compute_what_the_fused_ones_do(model_type: str) -> None:
    model = tiny_model(model_type)
    ids = torch.randint(0, VOCAB, (3, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fused = model(ids).logits
        fused_param = model.model.layers[0].mlp.experts.gate_up_proj
        assert unfuse_experts(model) == 2 and unfuse_experts(model) == 0  # once per block
        experts = model.model.layers[0].mlp.experts
        assert isinstance(experts, ExpertLinears)
        # views of the fused tensor: gate rows first, then up; no copy
        assert experts[1].up_proj.weight.untyped_storage().data_ptr() == fused_param.untyped_storage().data_ptr()
        inner = fused_param.shape[1] // 2
        torch.testing.assert_close(experts[1].up_proj.weight, fused_param[1, inner:], rtol=0, atol=0)
        torch.testing.assert_close(model(ids).logits, fused, rtol=0, atol=1e-6)


def test_calibrating_runs_every_expert_on_every_token_and_keeps_the_routing() -> None:
    model = tiny_model("qwen3_moe")
    unfuse_experts(model)
    block = model.model.layers[0]
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    seen: dict[int, int] = {}
    hooks = [expert.down_proj.register_forward_pre_hook(
        lambda m, a, e=e: seen.__setitem__(e, seen.get(e, 0) + a[0].shape[0]))
        for e, expert in enumerate(block.mlp.experts)]
    with torch.no_grad():
        normal = model(ids).logits
        routed = dict(seen)
        seen.clear()
        with calibrating(block) as experts:
            reset_counts(experts)
            calibrated = model(ids).logits
            counts = experts["mlp.experts"].routed.tolist()
    for hook in hooks:
        hook.remove()
    torch.testing.assert_close(calibrated, normal, rtol=0, atol=1e-5)  # same routing, same output
    assert seen == dict.fromkeys(range(8), ids.numel())  # every expert saw every token
    assert counts == [routed.get(e, 0) for e in range(8)] and sum(counts) == ids.numel() * 2
    assert not expert_modules(block)["mlp.experts"].calibrate_all  # off again


def test_an_expert_hessian_weighs_tokens_it_was_not_sent_less(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each linear of an expert sees its routed tokens' rows as they are and the others' scaled
    by sqrt(UNROUTED_WEIGHT): XᵀX weighs them 1 and UNROUTED_WEIGHT; the outputs do not change."""
    model = tiny_model("qwen3_moe")
    unfuse_experts(model)
    block = model.model.layers[0]
    experts = block.mlp.experts
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
    inputs: dict[str, torch.Tensor] = {}
    hooks = [getattr(experts[3], name).register_forward_pre_hook(
        lambda m, a, n=name: inputs.__setitem__(n, a[0].detach().clone()))
        for name in ("gate_proj", "down_proj")]
    weight = ExpertLinears.UNROUTED_WEIGHT
    with torch.no_grad():
        normal = model(ids).logits
        with calibrating(block):
            monkeypatch.setattr(ExpertLinears, "UNROUTED_WEIGHT", 1.0)  # every row as it is
            torch.testing.assert_close(model(ids).logits, normal, rtol=0, atol=1e-5)
            plain = dict(inputs)
            monkeypatch.setattr(ExpertLinears, "UNROUTED_WEIGHT", weight)
            torch.testing.assert_close(model(ids).logits, normal, rtol=0, atol=1e-5)
    for hook in hooks:
        hook.remove()
    routed = experts.routed  # counted over the three passes: 3x the tokens sent to each expert
    assert 0 < int(routed[3]) < 3 * ids.numel()
    for name, x in inputs.items():
        ratio = (x.norm(dim=1) / plain[name].norm(dim=1).clamp(min=1e-12))
        sent = torch.isclose(ratio, torch.tensor(1.0), rtol=1e-4)
        assert int(sent.sum()) == int(routed[3]) // 3, name  # the routed rows unchanged
        torch.testing.assert_close(ratio[~sent], torch.full_like(ratio[~sent], weight ** 0.5),
                                   rtol=1e-3, atol=0)


def test_experts_are_solved_in_chunks_that_cover_each_once() -> None:
    config = MOE_CONFIGS["qwen3_moe"]()
    arch = get_arch("qwen3_moe")
    whole = arch.for_config(config)
    chunked = arch.for_config(config, chunk_bytes=200_000)  # ~3 experts' gate/up per chunk
    assert whole.for_config(config, chunk_bytes=200_000) == chunked  # re-chunks, never appends
    assert whole.module_names and sorted(whole.module_names) == sorted(chunked.module_names)
    expert_groups = [g for g in chunked.sequential if chunked.is_expert(g[0])]
    assert len(expert_groups) > 2
    gate_up = [g for g in expert_groups if g[0].endswith(("gate_proj", "up_proj"))]
    assert all(len(g) <= 2 * 3 for g in gate_up)
    names = [n for g in expert_groups for n in g]
    assert len(names) == len(set(names)) == 8 * 3
    # all at once (true_sequential off): the dense layers together, the experts still chunked
    groups = chunked.groups(true_sequential=False)
    assert groups[0] == tuple(n for n in chunked.module_names if not chunked.is_expert(n))
    assert groups[1:] == tuple(expert_groups)


def test_blocks_without_experts_are_refused_before_any_work() -> None:
    config = tf.Qwen3MoeConfig(num_experts=4, mlp_only_layers=[0], num_hidden_layers=2)
    with pytest.raises(UnsupportedArchitecture, match="mlp_only_layers"):
        get_arch(config)


def test_experts_not_split_by_gptqd_are_refused() -> None:
    """Per-expert modules with another forward (e.g. a library's patch of transformers'
    classes) would get routed-only Hessians silently: refused, naming the module."""
    model = tiny_model("mixtral")
    layer = model.model.layers[1].mlp
    layer.experts = torch.nn.ModuleList([torch.nn.Linear(4, 4)])
    with pytest.raises(UnsupportedArchitecture, match=r"model\.layers\.1\.mlp\.experts is a ModuleList"):
        get_arch(model).blocks(model)
