from __future__ import annotations

import pytest
import torch

from worker.gptq.quantizer import dequantize, find_params, quantize


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_symmetric_zero_is_midpoint_and_range_covers_row(bits: int) -> None:
    w = torch.randn(16, 64)
    scale, zero = find_params(w, bits, sym=True)
    maxq = 2**bits - 1
    assert torch.all(zero == (maxq + 1) / 2)
    q = quantize(w, scale, zero, maxq)
    assert q.min() >= 0 and q.max() <= maxq
    # a symmetric grid puts the largest |w| within half a step of the grid's edge
    err = (dequantize(q, scale, zero) - w).abs()
    assert torch.all(err <= scale * 1.001)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_asymmetric_grid_error_is_at_most_one_step(bits: int) -> None:
    w = torch.rand(16, 64) * 3 - 0.5  # skewed range
    scale, zero = find_params(w, bits, sym=False)
    assert torch.all((zero >= 0) & (zero <= 2**bits - 1))
    dq = dequantize(quantize(w, scale, zero, 2**bits - 1), scale, zero)
    err = (dq - w).abs()
    # rounding the zero point can shift the grid by half a step, so the row's edge may clip
    assert torch.all(err <= scale + 1e-5)
    assert err.mean() < (scale / 2).mean()


def test_scales_are_fp16_representable_and_zero_rows_are_safe() -> None:
    w = torch.randn(4, 32)
    w[1] = 0
    scale, zero = find_params(w, 4, sym=False)
    assert torch.equal(scale, scale.half().float())
    assert torch.all(scale > 0)
    assert torch.all(quantize(w[1:2], scale[1:2], zero[1:2], 15) == zero[1])


def test_mse_clipping_never_increases_error() -> None:
    torch.manual_seed(0)
    w = torch.randn(32, 128)
    w[:, 0] *= 20  # outliers make the full range wasteful
    for sym in (True, False):
        s0, z0 = find_params(w, 3, sym)
        s1, z1 = find_params(w, 3, sym, mse=True)
        e0 = (dequantize(quantize(w, s0, z0, 7), s0, z0) - w).abs().pow(2.4).sum(1)
        e1 = (dequantize(quantize(w, s1, z1, 7), s1, z1) - w).abs().pow(2.4).sum(1)
        assert torch.all(e1 <= e0 + 1e-5)
        assert e1.sum() < e0.sum()


def _one_shrink_at_a_time(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipping search written as its definition: each shrink tried in turn."""
    from worker.gptq.quantizer import _range_params

    maxq, zeros = 2**bits - 1, torch.zeros(w.shape[0])
    xmin, xmax = torch.minimum(w.min(1).values, zeros), torch.maximum(w.max(1).values, zeros)
    best = torch.full((w.shape[0],), float("inf"))
    scale, zero = _range_params(xmin, xmax, maxq, sym)
    for i in range(80):
        s, z = _range_params((1 - i / 100) * xmin, (1 - i / 100) * xmax, maxq, sym)
        err = (dequantize(quantize(w, s[:, None], z[:, None], maxq), s[:, None], z[:, None]) - w
               ).abs().pow(2.4).sum(1)
        better = err < best
        best, scale, zero = (torch.where(better, err, best), torch.where(better, s, scale),
                             torch.where(better, z, zero))
    return scale[:, None], zero[:, None]


@pytest.mark.parametrize("batch_elements", [1, 7 * 64 * 32, 1 << 23])
def test_the_batched_clipping_search_picks_what_one_shrink_at_a_time_picks(
        batch_elements: int, monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.gptq import quantizer

    # one candidate per batch, batches of 7 (ties across batches), all 80 at once
    monkeypatch.setattr(quantizer, "MSE_BATCH_ELEMENTS", batch_elements)
    torch.manual_seed(1)
    w = torch.randn(64, 32)
    w[::3, 0] *= 20
    w[5] = 0  # an empty row: every shrink ties
    for bits in (2, 3, 4, 8):
        for sym in (True, False):
            got = find_params(w, bits, sym, mse=True)
            want = _one_shrink_at_a_time(w, bits, sym)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (bits, sym)


def test_the_clipping_search_is_a_few_kernels_not_a_few_per_shrink() -> None:
    """On a GPU each op is a kernel launch: one loop step per shrink made ~1,000 per group."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountOps(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            CountOps.ops += 1
            return func(*args, **(kwargs or {}))

    w = torch.randn(256, 128)
    with CountOps():
        find_params(w, 4, sym=False, mse=True)
    assert CountOps.ops < 80, CountOps.ops  # 80 shrinks are tried
