"""Group-aware reordering (act_group_aware): the solve order, and a result that stays on the
static group grid (g_idx = i // group, each group's scale and zero where a loader looks)."""

from __future__ import annotations

import pytest
import torch

from worker.gptq.config import QuantizeConfig
from worker.gptq.gptq import GPTQ, solve_order


def _layer(K: int = 96, N: int = 24, seed: int = 0) -> GPTQ:
    """A layer whose inputs have very different scales, so the Hessian diagonal orders them."""
    gen = torch.Generator().manual_seed(seed)
    solver = GPTQ(torch.randn(N, K, generator=gen))
    scale = torch.rand(K, generator=gen) * 4 + 0.1
    mix = torch.eye(K) + 0.3 * torch.randn(K, K, generator=gen) / K**0.5
    solver.add_batch((torch.randn(512, K, generator=gen) @ mix) * scale)
    return solver


def test_order_keeps_each_group_one_run_sorted_by_importance() -> None:
    diag = torch.rand(80, generator=torch.Generator().manual_seed(3))
    order = solve_order(diag, QuantizeConfig(group_size=16))
    assert sorted(order.tolist()) == list(range(80))
    runs = order.view(5, 16)
    for run in runs:  # one original group per run, its columns by decreasing diagonal
        assert len(set((run // 16).tolist())) == 1
        assert torch.all(diag[run][:-1] >= diag[run][1:])
    maxima = diag[runs].amax(dim=1)
    assert torch.all(maxima[:-1] >= maxima[1:])  # groups by their largest diagonal entry
    assert not torch.equal(order, torch.arange(80))


def test_a_last_shorter_group_stays_last() -> None:
    diag = torch.arange(40, dtype=torch.float32)  # the tail holds the largest entries
    order = solve_order(diag, QuantizeConfig(group_size=16))
    assert order[32:].tolist() == list(range(32, 40))
    assert sorted(order[:32].tolist()) == list(range(32))


def test_desc_act_overrides_it_and_off_means_natural_order() -> None:
    diag = torch.rand(32)
    assert torch.equal(solve_order(diag, QuantizeConfig(group_size=16, desc_act=True)),
                       torch.argsort(diag, descending=True))
    assert solve_order(diag, QuantizeConfig(group_size=16, act_group_aware=False)) is None
    # the config says what is used: never with act-order, nor per channel (one group)
    assert not QuantizeConfig(desc_act=True).act_group_aware
    assert not QuantizeConfig(group_size=-1).act_group_aware
    assert QuantizeConfig(group_size=-1).to_dict()["act_group_aware"] is False


@pytest.mark.parametrize("bits,sym,static", [(4, True, False), (3, False, False), (4, True, True)])
def test_result_sits_on_the_static_group_grid(bits: int, sym: bool, static: bool) -> None:
    config = QuantizeConfig(bits=bits, group_size=32, sym=sym, static_groups=static, mse=False)
    reordered = _layer().solve(config)
    natural = _layer().solve(QuantizeConfig(**{**config.to_dict(), "act_group_aware": False}))
    assert torch.equal(reordered.g_idx, torch.arange(96, dtype=torch.int32) // 32)
    # each group's scale and zero are those its columns were quantized with
    g = reordered.g_idx.long()
    rebuilt = reordered.scales[g].t() * (reordered.codes - reordered.zeros[g].t())
    assert torch.equal(rebuilt, reordered.weight)
    assert not torch.equal(reordered.codes, natural.codes)  # the order really changed the solve


def test_it_loses_less_than_the_natural_order_on_skewed_inputs() -> None:
    """The reconstruction error ||(W - Q) X|| over several layers: group-aware order must not
    be worse in total (on the fixtures it is 3-8% better: docs/engine.md)."""
    totals = {True: 0.0, False: 0.0}
    for seed in range(4):
        for gar in totals:
            solver = _layer(seed=seed)
            H = solver.hessian()
            result = solver.solve(QuantizeConfig(bits=3, group_size=32, act_group_aware=gar, mse=False))
            delta = solver.weight - result.weight
            totals[gar] += float(torch.einsum("nk,kl,nl->", delta, H, delta))
    assert totals[True] < totals[False], totals
