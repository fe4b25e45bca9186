"""The Triton kernel for a block's per-column steps against the torch loop, on the CPU through
Triton's interpreter (TRITON_INTERPRET=1; skipped where triton is not installed).

Tolerance: the interpreter computes the kernel's steps in numpy float32, each product and
difference rounded on its own, as the compiled kernel does (built without FMA:
test_kernel_build.py); the torch loop's rank-1 update (addr_) may round its last bit otherwise,
and a value moved across a rounding tie changes a code that the error feedback carries on. So: codes identical on at least 99.9% of entries, scales and zero points on at
least 99.9%, dequantized weights within 1e-5 relative where the codes agree, g_idx identical,
loss within 1e-4 relative. In the interpreter the codes and dequantized weights came out
identical in every setting tried; the losses differ by about 1e-7 relative (the torch loop's
rank-1 update and the kernel's round differently in the last bit now and then).
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")  # tests/conftest.py sets it before triton is imported
triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from tests.unit.test_stacked_solve import SETTINGS, inputs, sharing  # noqa: E402
from worker.gptq import columnkernel, columns_triton  # noqa: E402
from worker.gptq.columns_triton import _round_half_even  # noqa: E402
from worker.gptq.config import QuantizeConfig  # noqa: E402
from worker.gptq.gptq import LayerQuantResult, solve_together  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="the kernel runs on the CPU only in Triton's interpreter")


def assert_close_solution(a: LayerQuantResult, b: LayerQuantResult) -> None:
    """The tolerance of the module docstring."""
    same = a.codes == b.codes
    assert same.float().mean() >= 0.999
    assert (a.zeros == b.zeros).float().mean() >= 0.999
    assert torch.isclose(a.scales, b.scales, rtol=1e-5, atol=0).float().mean() >= 0.999
    torch.testing.assert_close(a.weight[same], b.weight[same], rtol=1e-5, atol=1e-7)
    assert torch.equal(a.g_idx, b.g_idx)
    assert a.damp_percent == b.damp_percent and a.nsamples == b.nsamples
    assert a.loss == pytest.approx(b.loss, rel=1e-4)


def solve_with(kernel: str, weights: list[torch.Tensor], x: torch.Tensor,
               config: QuantizeConfig) -> list[LayerQuantResult]:
    return list(solve_together(sharing(weights, x), config, consume=True, kernel=kernel == "triton"))


# the interpreter runs the kernel in Python (~3 s a case): every value of every setting, each
# pair of settings together somewhere, rather than all 44 combinations of test_stacked_solve
KERNEL_SETTINGS = [
    dict(bits=bits, group_size=group, sym=sym, desc_act=act, static_groups=static)
    for bits, group, sym, act, static in (
        (2, 32, True, False, False), (2, -1, False, True, False), (3, 32, False, False, True),
        (3, -1, True, True, False), (4, 32, True, True, True), (4, -1, False, False, False),
        (8, 32, False, True, True), (8, -1, True, False, False), (4, 32, False, True, False))
]
assert all(s in SETTINGS for s in KERNEL_SETTINGS)


@pytest.mark.parametrize("settings", KERNEL_SETTINGS,
                         ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_kernel_equals_torch_loop(settings: dict) -> None:
    # blocks of 32 columns, groups of 32 or all 80 columns (a run ends at a block's end), an
    # incomplete last block, 72 output channels: two tiles, the second partly masked
    config = QuantizeConfig(block_size=32, **settings)
    torch.manual_seed(0)
    weights = [torch.randn(48, 80), torch.randn(24, 80)]
    x = inputs(400, 80)  # with dead inputs
    kernel = solve_with("triton", weights, x, config)
    loop = solve_with("torch", weights, x, config)
    for a, b in zip(kernel, loop, strict=True):
        assert_close_solution(a, b)
        assert torch.all(a.weight[:, 3] == 0)


@pytest.mark.parametrize("group_size", [16, 64])
def test_groups_narrower_and_wider_than_a_block(group_size: int) -> None:
    """Groups of 16 make two runs per 32-column block; groups of 64 span two blocks (the
    group's parameters come from columns the next block's update has not reached yet)."""
    config = QuantizeConfig(bits=4, group_size=group_size, block_size=32, desc_act=True, mse=True)
    torch.manual_seed(1)
    weights = [torch.randn(40, 128)]
    x = inputs(512, 128, seed=1)
    [kernel] = solve_with("triton", weights, x, config)
    [loop] = solve_with("torch", weights, x, config)
    assert_close_solution(kernel, loop)


@triton.jit
def _rounding(X, Y, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(Y + offs, _round_half_even(tl.load(X + offs, mask=mask)), mask=mask)


def test_round_half_even_matches_torch() -> None:
    x = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 0.49999997, 0.50000006, -0.49999997, 7.0, -3.2, 254.5])
    y = torch.empty_like(x)
    _rounding[(1,)](x, y, x.numel(), BLOCK=16)
    assert torch.equal(y, torch.round(x))


def test_the_device_check_passes_the_kernel() -> None:
    """columnkernel's check, which `auto` runs before using the kernel on a GPU: here on CPU
    tensors in the interpreter."""
    assert columnkernel.disagreement(torch.device("cpu")) is None


def test_the_device_check_catches_a_kernel_without_error_feedback(monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel that forgets to carry each column's error to the block's later columns (U's
    off-diagonal ignored) still quantizes onto the grid: only the comparison catches it."""
    right = columns_triton.quantize_columns

    def no_feedback(W1, U1, *args, **kwargs):
        return right(W1, torch.diag(torch.diagonal(U1)), *args, **kwargs)

    monkeypatch.setattr(columns_triton, "quantize_columns", no_feedback)
    reason = columnkernel.disagreement(torch.device("cpu"))
    assert reason is not None and "of the loop's codes" in reason
