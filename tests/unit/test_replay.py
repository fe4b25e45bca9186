"""Replaying a finished attention's output in later passes changes nothing but the work."""

from __future__ import annotations

import pytest
import torch

from tests.tiny_models import CONFIGS, VOCAB, tiny_model
from worker.gptq.config import QuantizeConfig
from worker.gptq.pipeline import quantize_model
from worker.gptq.replay import FinishedChildren

CALIB = torch.randint(0, VOCAB, (12, 48), generator=torch.Generator().manual_seed(3))


def run(model_type: str, monkeypatch: pytest.MonkeyPatch, replay: bool, desc_act: bool = False) -> tuple:
    replays: list[int] = []
    clear = FinishedChildren.clear

    def counting_clear(self: FinishedChildren) -> None:
        replays.append(self.replayed)
        clear(self)

    monkeypatch.setattr(FinishedChildren, "clear", counting_clear)
    if not replay:
        monkeypatch.setattr(FinishedChildren, "install", lambda self, groups_done: None)
    model = tiny_model(model_type)
    result = quantize_model(model, CALIB, QuantizeConfig(bits=4, group_size=32, desc_act=desc_act),
                            device="cpu", batch_size=4)
    monkeypatch.undo()
    with torch.no_grad():
        logits = model(CALIB[:2]).logits
    return result.layers, logits, replays


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_replay_is_bit_identical(model_type: str, monkeypatch: pytest.MonkeyPatch) -> None:
    replayed, logits, replays = run(model_type, monkeypatch, replay=True)
    computed, expected, none = run(model_type, monkeypatch, replay=False)
    # the attention was replayed in the last group's pass and the output pass (3 batches each)
    # of every block but the last, whose outputs are not computed
    assert replays[0] == 2 * 3 and replays[-1] == 3, replays
    assert set(none) == {0}
    assert replayed.keys() == computed.keys()
    for name, layer in replayed.items():
        assert torch.equal(layer.codes, computed[name].codes), name
        assert torch.equal(layer.scales, computed[name].scales), name
    assert torch.equal(logits, expected)


def test_a_changed_input_is_computed_not_replayed() -> None:
    """The checksum guard: a different input to a wrapped child recomputes its output."""
    model = tiny_model("llama")
    block = model.model.layers[0]
    children = FinishedChildren(block, [("self_attn.q_proj",), ("mlp.down_proj",)])
    children.install(1)
    mlp_input = torch.randn(1, 5, 64)
    attention = block.self_attn
    kwargs = dict(attention_mask=None, position_embeddings=model.model.rotary_emb(mlp_input, torch.arange(5)[None]))
    with torch.no_grad():
        first = attention(hidden_states=mlp_input, **kwargs)[0]
        again = attention(hidden_states=mlp_input.clone(), **kwargs)[0]
        other = attention(hidden_states=mlp_input + 1, **kwargs)[0]
    children.clear()
    assert children.replayed == 1
    assert again is first
    assert not torch.equal(other, first)
