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
    to max_shrink in 1/grid steps, per row, keeping the one with the lowest |w - w'|^norm.
    """
    maxq = 2**bits - 1
    w = w.float()
    zeros = torch.zeros(w.shape[0], device=w.device)
    xmin = torch.minimum(w.min(dim=1).values, zeros)
    xmax = torch.maximum(w.max(dim=1).values, zeros)
    scale, zero = _range_params(xmin, xmax, maxq, sym)
    if mse:
        best = torch.full_like(scale, float("inf"))
        for i in range(int(max_shrink * grid)):
            p = 1 - i / grid
            s, z = _range_params(p * xmin, p * xmax, maxq, sym)
            q = dequantize(quantize(w, s[:, None], z[:, None], maxq), s[:, None], z[:, None])
            err = (q - w).abs().pow(norm).sum(dim=1)
            better = err < best
            best = torch.where(better, err, best)
            scale = torch.where(better, s, scale)
            zero = torch.where(better, z, zero)
    return scale[:, None], zero[:, None]
