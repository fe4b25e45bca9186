"""Layers that share one Hessian (q/k/v, gate/up) solved as one stacked problem.

GPTQ's error feedback acts on each output row on its own, so the stacked solve gives each layer
what its own solve gives. The only arithmetic that can differ is the lazy block update
Wᵀ[i2:] -= U[i1:i2, i2:]ᵀ Err, a matrix product whose inner sums a BLAS may order differently
for a wider right-hand side. Tolerance (assert_same_solution): codes and zero points identical on
at least 99.9% of entries; scales and dequantized weights where the codes agree within 1e-5
relative; g_idx, damping and sample counts identical; loss within 1e-5 relative. On the
development machine (x86-64, torch 2.13's MKL) the results are bit-for-bit identical, and the
pipeline test in test_shared_hessian.py holds the whole checkpoint to that.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from worker.gptq.arch import weight_view
from worker.gptq.config import QuantizeConfig
from worker.gptq.gptq import GPTQ, LayerQuantResult, solve_together
from worker.gptq.pipeline import sharing_sets

ROWS = (48, 16, 32)  # q, k, v of a GQA attention: k and v narrower


def inputs(tokens: int, columns: int, seed: int = 0) -> torch.Tensor:
    """Correlated inputs of uneven energy, with dead inputs (never firing)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, 16, generator=gen) @ torch.randn(16, columns, generator=gen)
    x = x + 0.1 * torch.randn(tokens, columns, generator=gen)
    x = x * torch.logspace(-1, 0.5, columns)[torch.randperm(columns, generator=gen)]
    x[:, [3, columns // 2]] = 0
    return x


def sharing(weights: list[torch.Tensor], x: torch.Tensor) -> list[GPTQ]:
    """Solvers sharing one XᵀX, as the pipeline's shared-input tracker leaves them."""
    solvers = [GPTQ(w) for w in weights]
    for chunk in x.split(256):
        solvers[0].add_batch(chunk)
    for solver in solvers[1:]:
        solver.xtx, solver.nsamples = solvers[0].xtx, solvers[0].nsamples
    return solvers


def separately(weights: list[torch.Tensor], x: torch.Tensor, config: QuantizeConfig) -> list[LayerQuantResult]:
    return [solver.solve(config) for solver in sharing(weights, x)]


def together(weights: list[torch.Tensor], x: torch.Tensor, config: QuantizeConfig) -> list[LayerQuantResult]:
    return list(solve_together(sharing(weights, x), config, consume=True))


def assert_same_solution(a: LayerQuantResult, b: LayerQuantResult) -> None:
    """The tolerance of the module docstring."""
    assert a.codes.shape == b.codes.shape and a.codes.dtype == b.codes.dtype == torch.int32
    same = a.codes == b.codes
    assert same.float().mean() >= 0.999
    assert (a.zeros == b.zeros).float().mean() >= 0.999
    torch.testing.assert_close(a.scales, b.scales, rtol=1e-5, atol=0)
    torch.testing.assert_close(a.weight[same], b.weight[same], rtol=1e-5, atol=1e-7)
    assert torch.equal(a.g_idx, b.g_idx) and a.g_idx.dtype == b.g_idx.dtype
    assert a.damp_percent == b.damp_percent and a.nsamples == b.nsamples
    assert a.loss == pytest.approx(b.loss, rel=1e-5)


SETTINGS = [
    dict(bits=bits, group_size=group_size, sym=sym, desc_act=act, static_groups=static)
    for bits, group_size, sym, act, static in itertools.product(
        (2, 3, 4, 8), (-1, 32), (True, False), (False, True), (False, True))
    if not (static and group_size == -1)
]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_stacked_equals_per_layer(settings: dict) -> None:
    config = QuantizeConfig(block_size=32, **settings)  # several lazy blocks on 96 columns
    torch.manual_seed(0)
    weights = [torch.randn(n, 96) for n in ROWS]
    x = inputs(512, 96)
    stacked, alone = together(weights, x, config), separately(weights, x, config)
    assert len(stacked) == len(ROWS)
    for a, b, n in zip(stacked, alone, ROWS, strict=True):
        assert a.codes.shape == (n, 96)
        assert_same_solution(a, b)
        assert torch.all(a.weight[:, 3] == 0) and torch.all(a.weight[:, 48] == 0)  # dead inputs


def test_stacked_with_mse_search_and_wide_layers() -> None:
    """Several 128-column blocks, the default block size, and the clipping search."""
    config = QuantizeConfig(bits=3, group_size=128, desc_act=True, mse=True)
    torch.manual_seed(1)
    weights = [torch.randn(256, 384), torch.randn(64, 384)]
    x = inputs(1024, 384, seed=1)
    for a, b in zip(together(weights, x, config), separately(weights, x, config), strict=True):
        assert_same_solution(a, b)


def test_each_layer_reports_its_own_loss_and_a_share_of_the_time() -> None:
    config = QuantizeConfig(bits=4, group_size=32)
    torch.manual_seed(2)
    small, large = torch.randn(8, 64), torch.randn(56, 64)
    large[:8] = small  # the same rows again, and more: a larger loss
    results = together([small, large], inputs(256, 64), config)
    assert 0 < results[0].loss < results[1].loss
    # time is shared by rows: 8 of 64 and 56 of 64
    assert results[1].seconds == pytest.approx(7 * results[0].seconds)


def test_conv1d_weights_stack_with_linear_ones() -> None:
    """GPT-2's Conv1D stores [in, out]: its [out, in] view is a transposed, non-contiguous
    tensor; stacked with an nn.Linear's it gives what each solve gives alone."""
    torch.manual_seed(3)
    conv, linear = Conv1D(24, 64), nn.Linear(64, 40)
    nn.init.normal_(conv.weight)
    weights = [weight_view(conv), weight_view(linear)]
    assert not weights[0].is_contiguous()
    config = QuantizeConfig(bits=4, group_size=32, desc_act=True)
    x = inputs(256, 64, seed=3)
    for a, b in zip(together(weights, x, config), separately(weights, x, config), strict=True):
        assert_same_solution(a, b)
    assert torch.equal(conv.weight, weights[0].t())  # the module's weight is not modified


def test_consume_drops_the_sums_and_weights() -> None:
    solvers = sharing([torch.randn(8, 32), torch.randn(4, 32)], inputs(128, 32))
    list(solve_together(solvers, QuantizeConfig(bits=4, group_size=32), consume=True))
    assert all(s.xtx is None and s.weight is None for s in solvers)


def test_layers_with_their_own_hessians_are_refused() -> None:
    a, b = GPTQ(torch.randn(8, 32)), GPTQ(torch.randn(8, 32))
    a.add_batch(torch.randn(64, 32))
    b.add_batch(torch.randn(64, 32))
    with pytest.raises(ValueError, match="share one"):
        list(solve_together([a, b], QuantizeConfig(bits=4, group_size=32)))


def test_sharing_sets_follow_the_shared_sums_in_order() -> None:
    q, k, v, o = (GPTQ(torch.zeros(4, 8)) for _ in range(4))
    k.xtx = v.xtx = q.xtx
    assert sharing_sets({"q": q, "k": k, "v": v, "o": o}) == [["q", "k", "v"], ["o"]]
    assert sharing_sets({"o": o, "q": q}) == [["o"], ["q"]]  # nothing shared: one solve each
