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


# elements of one [candidates, rows, columns] batch of the clipping search: each step of it
# makes a few tensors that size (32 MiB each in float32)
MSE_BATCH_ELEMENTS = 1 << 23


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
    (the first such, on a tie).
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
    """Every shrink 1 - i/grid (i < steps) tried at once, a batch of them per step: a loop over
    the candidates would be about a thousand tiny kernels per group on a GPU."""
    rows, cols = w.shape
    batch = max(1, min(steps, MSE_BATCH_ELEMENTS // max(1, rows * cols)))
    best = torch.full((rows,), float("inf"), device=w.device)
    scale = torch.empty(rows, device=w.device)
    zero = torch.empty(rows, device=w.device)
    for first in range(0, steps, batch):
        shrink = 1 - torch.arange(first, min(steps, first + batch), device=w.device) / grid
        s, z = _range_params(shrink[:, None] * xmin, shrink[:, None] * xmax, maxq, sym)  # [b, R]
        # quantize() then dequantize() minus w, written in place: one [b, R, C] tensor instead
        # of one per step (3x faster on the CPU, the same values bit for bit)
        scale3, zero3 = s[..., None], z[..., None]
        err3 = torch.div(w, scale3).round_().add_(zero3).clamp_(0, maxq).sub_(zero3).mul_(scale3)
        err, pick = err3.sub_(w).abs_().pow_(norm).sum(dim=2).min(dim=0)  # first minimum on ties
        del err3
        better = err < best  # strictly: an earlier batch keeps a tie
        best = torch.where(better, err, best)
        scale = torch.where(better, s.gather(0, pick[None]).squeeze(0), scale)
        zero = torch.where(better, z.gather(0, pick[None]).squeeze(0), zero)
    return scale[:, None], zero[:, None]
