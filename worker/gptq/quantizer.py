"""Uniform affine quantization of weight rows: scale and zero point per row (per group of columns).

Semantics are those every GPTQ loader assumes (see gptq-format.md §2):
q = clamp(round(w / scale) + zero, 0, maxq) and w' = scale * (q - zero).
Scales are rounded to fp16 here, because the checkpoint stores them in fp16: the weights the
solver compensates against are then exactly the weights a loader reconstructs.
"""

from __future__ import annotations

import torch

# smallest scale kept: an all-zero (or near-zero) row must not divide by zero, and the value
# must survive the fp16 rounding of the checkpoint
MIN_SCALE = 1e-7


def _to_stored_scale(scale: torch.Tensor) -> torch.Tensor:
    return scale.clamp(min=MIN_SCALE).to(torch.float16).to(torch.float32)


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer codes (as float) of w; scale and zero broadcast against w."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (codes - zero)


def _range_params(
    xmin: torch.Tensor, xmax: torch.Tensor, maxq: int, sym: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, torch.full_like(xmin, -1.0), xmin)
    xmax = torch.where(empty, torch.full_like(xmax, 1.0), xmax)
    scale = _to_stored_scale((xmax - xmin) / maxq)
    if sym:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = torch.clamp(torch.round(-xmin / scale), 0, maxq)
    return scale, zero


# Elements of one [candidates, rows, columns] batch of the clipping search. On the CPU a 4 MiB
# tensor stays in cache across the batch's dozen passes (a 4096-row group's search: 22 ms, 30 ms
# at 32 MiB); on a GPU each pass is a kernel launch, so the batches are as large as memory allows.
MSE_BATCH_ELEMENTS = 1 << 20
CUDA_MSE_BATCH_ELEMENTS = 1 << 24
# The clipping search tries every SEARCH_STRIDE-th shrink, then the ones within SEARCH_STRIDE - 1
# of each row's best: 27 of 80 evaluations. On the fixture models' weights (2/3/4-bit, sym and
# asym, 15k rows) it picks another shrink than trying all 80 in 0.4-2% of rows, and its summed
# error is within 0.011% of theirs; the search itself is three times faster.
SEARCH_STRIDE = 4


def find_params(
    w: torch.Tensor,
    bits: int,
    sym: bool,
    mse: bool = False,
    *,
    grid: int = 100,
    max_shrink: float = 0.8,
    norm: float = 2.4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point for each row of w ([R, C]); both returned as [R, 1] float32.

    The range always contains 0 (xmin <= 0 <= xmax). With mse=True the range is shrunk by up
    to max_shrink in 1/grid steps, per row, keeping the one with the lowest |w - w'|^norm
    (the first such, on a tie) among those the coarse-to-fine search tries.
    """
    maxq = 2**bits - 1
    w = w.float()
    zeros = torch.zeros(w.shape[0], device=w.device)
    xmin = torch.minimum(w.min(dim=1).values, zeros)
    xmax = torch.maximum(w.max(dim=1).values, zeros)
    if not mse:
        scale, zero = _range_params(xmin, xmax, maxq, sym)
        return scale[:, None], zero[:, None]
    return _clip_search(w, xmin, xmax, maxq, sym, int(max_shrink * grid), grid, norm)


def _clip_search(w: torch.Tensor, xmin: torch.Tensor, xmax: torch.Tensor, maxq: int, sym: bool,
                 steps: int, grid: int, norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Shrink step i means the range times 1 - i/grid (i < steps): every SEARCH_STRIDE-th step
    first, then the window of steps around each row's best (that one again included, so the
    first minimum in shrink order wins inside the window)."""
    rows = w.shape[0]
    w = w.contiguous()  # a group of Wᵀ's rows arrives transposed: every pass reads it
    coarse = torch.arange(0, steps, SEARCH_STRIDE, device=w.device)[:, None].expand(-1, rows)
    step, _, _ = _best_shrink(w, xmin, xmax, maxq, sym, coarse, grid, norm)
    near = torch.arange(1 - SEARCH_STRIDE, SEARCH_STRIDE, device=w.device)
    window = (step[None] + near[:, None]).clamp_(0, steps - 1)
    _, scale, zero = _best_shrink(w, xmin, xmax, maxq, sym, window, grid, norm)
    return scale[:, None], zero[:, None]


def _best_shrink(w: torch.Tensor, xmin: torch.Tensor, xmax: torch.Tensor, maxq: int, sym: bool,
                 steps: torch.Tensor, grid: int, norm: float,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Of the candidate shrink steps of each row ([candidates, R], tried in that order), the
    one with the lowest error, first on a tie: (step, scale, zero), each [R]. The candidates
    are tried a batch at a time: a loop over them would be about a thousand tiny kernels per
    group on a GPU."""
    rows, cols = w.shape
    budget = CUDA_MSE_BATCH_ELEMENTS if w.is_cuda else MSE_BATCH_ELEMENTS
    batch = max(1, min(steps.shape[0], budget // max(1, rows * cols)))
    for first in range(0, steps.shape[0], batch):
        tried = steps[first : first + batch]
        shrink = 1 - tried / grid
        s, z = _range_params(shrink * xmin, shrink * xmax, maxq, sym)  # [b, R]
        # quantize() then dequantize() minus w, written in place: one [b, R, C] tensor instead
        # of one per step (3x faster on the CPU, the same values bit for bit)
        scale3, zero3 = s[..., None], z[..., None]
        err3 = torch.div(w, scale3).round_().add_(zero3).clamp_(0, maxq).sub_(zero3).mul_(scale3)
        err, pick = error_norm(err3.sub_(w), norm).sum(dim=2).min(dim=0)  # first minimum on ties
        del err3
        picked = [t.gather(0, pick[None]).squeeze(0) for t in (tried, s, z)]
        if first == 0:
            best, (chosen, scale, zero) = err, picked
            continue
        better = err < best  # strictly: an earlier batch keeps a tie
        best = torch.where(better, err, best)
        chosen, scale, zero = (torch.where(better, new, old)
                               for new, old in zip(picked, (chosen, scale, zero), strict=True))
    return chosen, scale, zero


def error_norm(err: torch.Tensor, norm: float) -> torch.Tensor:
    """|err|^norm, in place, as exp(norm * log|err|): torch's pow with a fractional exponent
    is scalar code on the CPU (3.7x slower than log and exp, which are vectorised); the two
    differ by a few ulp (zero stays zero: log 0 = -inf)."""
    return err.abs_().log_().mul_(norm).exp_()
