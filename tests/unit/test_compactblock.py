"""A compact linear computes with exactly the weight the fp32 path would hold."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from worker.gptq.arch import set_weight, weight_view
from worker.gptq.compactblock import CompactLinears
from worker.gptq.config import QuantizeConfig
from worker.gptq.gptq import GPTQ


@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("desc_act", [False, True])
def test_solved_weight_is_the_solvers_bit_for_bit(conv1d: bool, desc_act: bool) -> None:
    torch.manual_seed(0)
    module = Conv1D(96, 640) if conv1d else nn.Linear(640, 96)  # K = 640: more than one 512-column chunk
    module.weight.data = module.weight.data.half()  # held as the checkpoint stores it
    x = torch.randn(5, 640)
    reference = copy.deepcopy(module).float()  # what the fp32 path holds: the same values in fp32
    compact = CompactLinears({"m": module}, torch.float32)
    with torch.no_grad():  # unsolved: the fp16 weight made fp32 just for the call
        assert torch.equal(module(x), reference(x))
    assert module.weight.dtype == torch.float16  # dropped again after the call

    solver = GPTQ(weight_view(module))
    solver.add_batch(torch.randn(256, 640))
    layer = solver.solve(QuantizeConfig(bits=4, group_size=64, desc_act=desc_act))
    compact.solved(module, layer)
    assert module.weight.device.type == "meta"
    made = compact._weight(module)
    assert torch.equal(made.t() if conv1d else made, layer.weight)
    set_weight(reference, layer.weight)  # the fp32 path after the solve
    with torch.no_grad():
        assert torch.equal(module(x), reference(x))
    compact.remove()
    assert not module._forward_pre_hooks and not module._forward_hooks


def test_a_weight_is_made_once_per_pass_and_dropped_when_the_pass_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    module = nn.Linear(64, 32)
    module.weight.data = module.weight.data.half()
    compact = CompactLinears({"m": module}, torch.float32)
    made = []
    weight = compact._weight
    monkeypatch.setattr(compact, "_weight", lambda m: made.append(m) or weight(m))
    x = torch.randn(3, 64)
    with torch.no_grad():
        first = [module(x) for _ in range(4)]  # four batches of one pass
    assert len(made) == 1 and all(torch.equal(y, first[0]) for y in first)
    assert module.weight.dtype == torch.float16  # between calls the module holds its own
    fp32 = next(iter(compact._made.values()))
    compact.pass_done()
    assert not compact._made  # nothing fp32 held into the solve that follows a pass
    assert sys.getrefcount(fp32) == 2  # only this test's name (and getrefcount's argument)
    with torch.no_grad():
        module(x)
    assert len(made) == 2  # the next pass makes it again

    solver = GPTQ(weight_view(module))
    solver.add_batch(torch.randn(128, 64))
    layer = solver.solve(QuantizeConfig(bits=4, group_size=32))
    compact.solved(module, layer)  # a solved layer's weight comes from its codes from now on
    with torch.no_grad():
        solved = module(x)
    assert torch.equal(solved, nn.functional.linear(x, layer.weight, module.bias))
    compact.remove()


def test_weights_past_the_pass_budget_are_made_per_call(monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.gptq import compactblock

    torch.manual_seed(0)
    first, second = nn.Linear(64, 32), nn.Linear(32, 64)  # 8 KiB each in fp32
    compact = CompactLinears({"a": first, "b": second}, torch.float32)
    monkeypatch.setattr(compactblock, "PASS_BYTES", 10 << 10)  # room for one of them
    x = torch.randn(3, 64)
    with torch.no_grad():
        for _ in range(3):
            y = second(first(x))
    assert list(compact._made) == [first]  # the one the pass ran first is kept
    assert torch.equal(y, second(first(x)))  # the other, made per call, computes the same
    compact.remove()
