from __future__ import annotations

import pytest
import torch

from worker.gptq.quantizer import dequantize, error_norm, find_params, quantize


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


def _errors_one_shrink_at_a_time(w: torch.Tensor, bits: int, sym: bool, steps: list[int]
                                 ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(error, scale, zero) of each row at each shrink step, one step at a time."""
    from worker.gptq.quantizer import _range_params, error_norm

    maxq, zeros = 2**bits - 1, torch.zeros(w.shape[0])
    xmin, xmax = torch.minimum(w.min(1).values, zeros), torch.maximum(w.max(1).values, zeros)
    out = []
    for i in steps:
        s, z = _range_params((1 - i / 100) * xmin, (1 - i / 100) * xmax, maxq, sym)
        deq = dequantize(quantize(w, s[:, None], z[:, None], maxq), s[:, None], z[:, None])
        out.append((error_norm(deq - w, 2.4).sum(1), s, z))
    return out


def _coarse_to_fine_one_step_at_a_time(w: torch.Tensor, bits: int, sym: bool
                                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipping search written as its definition, row by row: every 4th of the 80 shrinks,
    then the 7 around the best of those; the first minimum in shrink order wins."""
    every = _errors_one_shrink_at_a_time(w, bits, sym, list(range(80)))
    scale, zero = torch.empty(w.shape[0]), torch.empty(w.shape[0])
    for row in range(w.shape[0]):
        coarse = min(range(0, 80, 4), key=lambda i: (every[i][0][row].item(), i))
        window = [min(79, max(0, coarse + d)) for d in range(-3, 4)]
        best = min(window, key=lambda i: (every[i][0][row].item(), i))
        scale[row], zero[row] = every[best][1][row], every[best][2][row]
    return scale[:, None], zero[:, None]


def _outlier_rows(seed: int, rows: int, cols: int) -> torch.Tensor:
    torch.manual_seed(seed)
    w = torch.randn(rows, cols)
    w[::3, 0] *= 20
    w[5] = 0  # an empty row: every shrink ties
    return w


@pytest.mark.parametrize("batch_elements", [1, 7 * 64 * 32, 1 << 23])
def test_the_batched_clipping_search_picks_what_its_definition_picks(
        batch_elements: int, monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.gptq import quantizer

    # one candidate per batch, batches of 7 (ties across batches), all at once
    monkeypatch.setattr(quantizer, "MSE_BATCH_ELEMENTS", batch_elements)
    w = _outlier_rows(1, 64, 32)
    for bits in (2, 3, 4, 8):
        for sym in (True, False):
            got = find_params(w, bits, sym, mse=True)
            want = _coarse_to_fine_one_step_at_a_time(w, bits, sym)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (bits, sym)


def test_the_coarse_to_fine_search_loses_almost_nothing_to_trying_every_shrink() -> None:
    w = _outlier_rows(2, 256, 128)
    for bits in (2, 3, 4):
        for sym in (True, False):
            every = torch.stack([e for e, _, _ in _errors_one_shrink_at_a_time(w, bits, sym, list(range(80)))])
            s, z = find_params(w, bits, sym, mse=True)
            ours = error_norm(dequantize(quantize(w, s, z, 2**bits - 1), s, z) - w, 2.4).sum(1)
            assert torch.all(ours >= every.min(0).values * (1 - 1e-6))  # nothing beats all 80
            assert ours.sum() <= every.min(0).values.sum() * 1.001, (bits, sym)


def test_the_clipping_search_does_not_depend_on_the_thread_count() -> None:
    w = _outlier_rows(3, 512, 128)
    before = torch.get_num_threads()
    try:
        picks = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            picks.append([find_params(w, bits, sym, mse=True) for bits in (2, 4) for sym in (True, False)])
    finally:
        torch.set_num_threads(before)
    for (s1, z1), (s2, z2) in zip(*picks, strict=True):
        assert torch.equal(s1, s2) and torch.equal(z1, z2)


def test_the_column_loop_gives_the_clipping_search_every_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.gptq import gptq
    from worker.gptq.config import QuantizeConfig

    seen = []
    monkeypatch.setattr(gptq, "find_params", lambda *a: seen.append(torch.get_num_threads()) or (
        torch.ones(4, 1), torch.zeros(4, 1)))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with gptq._one_thread():
            assert torch.get_num_threads() == 1
            gptq._row_params(torch.randn(8, 4), QuantizeConfig())
            assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert seen == [2]


def test_the_clipping_search_is_a_few_kernels_not_a_few_per_shrink() -> None:
    """On a GPU each op is a kernel launch: one loop step per shrink made ~1,000 per group."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountOps(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            CountOps.ops += not func.is_view  # a view launches nothing
            return func(*args, **(kwargs or {}))

    w = torch.randn(256, 128)
    counts = []
    for max_shrink in (0.8, 0.4):  # 80 shrink steps, or 40
        CountOps.ops = 0
        with CountOps():
            find_params(w, 4, sym=False, mse=True, max_shrink=max_shrink)
        counts.append(CountOps.ops)
    # a few dozen per stage of the search, however many shrinks it tries
    assert counts[0] == counts[1] < 100, counts
