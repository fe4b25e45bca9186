"""GPTQ's per-column steps inside one lazy block as one Triton kernel launch (CUDA).

The torch loop in gptq.py launches about a dozen small kernels per column; on a GPU the solve is
then bound by launches, not arithmetic. Here one launch runs a run of columns that share their
group parameters: each program owns a tile of output channels (columns of Wᵀ), holds the whole
block of that tile in registers, and walks the block's columns in order: quantize, dequantize,
error / U[i, i], and the rank-1 update of the block's later columns. Error feedback never
crosses output channels, so the tiles are independent; a column is picked out of the tile with
a masked sum (exact: the other terms are zeros), so the loop touches memory only for U's row,
the group parameters and the outputs. The math is the torch loop's, step for step, and built
without fused multiply-adds (enable_fp_fusion=False): each product and difference rounded on its
own, as Triton's interpreter computes them, so the kernel the tests run on the CPU
(TRITON_INTERPRET=1, tests/unit/test_columns_triton.py) is the arithmetic a card runs. Its build
for each card generation (registers, no spills, no FMA) is checked on any machine by
bench/kernel_build.py (tests/unit/test_kernel_build.py).

Imported only when the kernel is used (gptq.COLUMN_KERNEL = "triton", or the environment's
GPTQD_COLUMN_KERNEL): triton is optional.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# output channels per program: a TinyLlama q/k/v stack (2560 rows) makes 80 programs, an 8B
# model's (6144) 192. A program's tile of a 128-column block is 128 x 32 fp32: 32 registers a
# thread with 4 warps; wider blocks get a warp per 32 rows, up to 256 (past that a thread's
# share no longer fits its registers: columnkernel.MAX_BLOCK)
TILE = 32
ROWS_PER_WARP = 32
MIN_WARPS = 4
# the kernel's argument types, for builds ahead of time (bench/kernel_build.py)
SIGNATURE = {
    "W": "*fp32", "U": "*fp32", "Err": "*fp32", "Q": "*fp32", "Codes": "*u8", "S": "*fp32",
    "Z": "*fp32", "start": "i32", "end": "i32", "nb": "i32", "N": "i32", "u_stride": "i32",
    "p_stride": "i32", "maxq": "fp32", "ROWS": "constexpr", "TILE_N": "constexpr",
}


def launch_options(nb: int) -> dict[str, int | bool]:
    """Compile-time settings of the kernel for blocks of nb columns."""
    rows = triton.next_power_of_2(nb)
    return dict(ROWS=rows, TILE_N=TILE, num_warps=max(MIN_WARPS, rows // ROWS_PER_WARP),
                enable_fp_fusion=False)


@triton.jit
def _round_half_even(x):
    """torch.round's rounding (ties to even), exactly: x - floor(x) is exact in fp32."""
    r = tl.floor(x)
    frac = x - r
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    up = (frac > 0.5) | ((frac == 0.5) & odd)
    return tl.where(up, r + 1.0, r)


@triton.jit
def _columns_kernel(
    W, U, Err, Q, Codes, S, Z,
    start, end, nb, N, u_stride, p_stride, maxq,
    ROWS: tl.constexpr, TILE_N: tl.constexpr,
):
    # the program's tile of the block, [ROWS >= nb, TILE_N], read once and kept in registers:
    # the loop below never waits for memory but for U's row and the parameters
    offs = tl.program_id(0) * TILE_N + tl.arange(0, TILE_N)
    rows = tl.arange(0, ROWS)
    channels = offs < N
    inside = (rows[:, None] < nb) & channels[None, :]
    tile = W + rows[:, None] * N + offs[None, :]
    w = tl.load(tile, mask=inside, other=0.0)
    for i in range(start, end):
        wi = tl.sum(tl.where(rows[:, None] == i, w, 0.0), axis=0)  # row i, exactly (+ zeros)
        scale = tl.load(S + (i - start) * p_stride + offs, mask=channels, other=1.0)
        zero = tl.load(Z + (i - start) * p_stride + offs, mask=channels, other=0.0)
        q = _round_half_even(tl.math.div_rn(wi, scale)) + zero
        q = tl.minimum(tl.maximum(q, 0.0), maxq)
        dq = (q - zero) * scale
        err = tl.math.div_rn(wi - dq, tl.load(U + i * u_stride + i))
        tl.store(Q + i * N + offs, dq, mask=channels)
        tl.store(Codes + i * N + offs, q.to(tl.uint8), mask=channels)
        tl.store(Err + i * N + offs, err, mask=channels)
        # the block's later columns carry this one's error (h is 0 on the others: w - 0 = w)
        h = tl.load(U + i * u_stride + rows, mask=(rows > i) & (rows < nb), other=0.0)
        w = w - h[:, None] * err[None, :]
    tl.store(tile, w, mask=inside)


def quantize_columns(
    W1: torch.Tensor,
    U1: torch.Tensor,
    Err1: torch.Tensor,
    Q1: torch.Tensor,
    codes1: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    start: int,
    end: int,
    maxq: int,
) -> None:
    """Columns start..end-1 of one block, in place: W1 [nb, N] (the block of Wᵀ, its later
    columns updated), U1 [nb, nb] (rows with any stride), Err1, Q1 [nb, N] float32 and codes1
    [nb, N] uint8 written. scale/zero: [N] for the whole run, or [end - start, N], one row
    per column (static groups)."""
    nb, N = W1.shape
    for tensor in (W1, Err1, Q1, codes1):
        if tensor.stride() != (N, 1):
            raise ValueError("the block's rows must be contiguous")
    per_column = scale.dim() == 2
    grid = (triton.cdiv(N, TILE),)
    _columns_kernel[grid](
        W1, U1, Err1, Q1, codes1, scale.contiguous(), zero.contiguous(),
        start, end, nb, N, U1.stride(0), N if per_column else 0, float(maxq), **launch_options(nb),
    )
