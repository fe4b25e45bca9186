"""The upper Cholesky factor of the damped inverse Hessian, in two K x K matrices of memory.

GPTQ needs U, upper triangular with UᵀU = (H + λI)⁻¹. The textbook route (Cholesky, inverse,
Cholesky again) holds three K x K matrices at its peak, which for a 5632-wide down_proj is
360 MiB, and has two factorisations that can fail. Here: if H + λI = R Rᵀ with R upper
triangular, then (H + λI)⁻¹ = R⁻ᵀR⁻¹, so U = R⁻¹. R is the ordinary Cholesky factor of H
with rows and columns in reverse order, reversed back; its inverse is computed in place. The
one factorisation is the only step that can fail, and H is still intact when it does.
"""

from __future__ import annotations

import math

import torch

from .errors import CholeskyError

_CHUNK = 1 << 20  # elements swapped at a time by the in-place reversal
_BLOCK = 128  # columns per step of the in-place triangular inverse


def inverse_hessian_factor(
    box: list[torch.Tensor], damp_percent: float, increment: float, max_damp: float
) -> tuple[torch.Tensor, float]:
    """(U, damp used). H is taken out of the one-element list `box` and consumed: its memory
    is reused, and it is freed as soon as its factor exists.

    λ = damp · mean(diag H), raised by `increment` until the factorisation succeeds."""
    H = box.pop()
    mean_diag = float(torch.mean(torch.diagonal(H)))
    _reverse(H)  # J H J: the damping below is the same on the reversed diagonal
    damp, applied = damp_percent, 0.0
    while math.isfinite(mean_diag):
        H.diagonal().add_((damp - applied) * mean_diag)
        applied = damp
        # upper=True: LAPACK writes H = UᵀU column-major, whose memory read row-major is the
        # lower factor L = Uᵀ: a view, no copy
        factor, info = torch.linalg.cholesky_ex(H, upper=True)
        if info == 0:
            del H, box  # from here on only the factor's memory (and small panels) is used
            L = factor.t()
            del factor
            _reverse(L)  # J L J = R, upper triangular, H + λI = R Rᵀ
            _invert_upper(L)
            if _finite(L):
                # the solver reads rows: row-major already unless LAPACK's layout changes
                return L.contiguous(), round(damp, 6)
            break
        del factor
        damp += increment
        if damp > max_damp:
            break
    raise CholeskyError(
        f"Cholesky factorisation failed even with damp_percent={damp:.4f}: the "
        "calibration inputs of this layer are degenerate; use more or more varied "
        "calibration samples, or a larger damp_percent"
    )


def _finite(A: torch.Tensor) -> bool:
    """isfinite(A).all(), a block of rows at a time (at once it makes K x K temporaries); the
    flags are combined on the device and read back once (once per block would wait for a
    GPU K/128 times)."""
    ok = torch.ones((), dtype=torch.bool, device=A.device)
    for i in range(0, A.shape[0], _BLOCK):
        ok &= torch.isfinite(A[i : i + _BLOCK]).all()
    return bool(ok)


def _reverse(A: torch.Tensor) -> None:
    """A ← J A J in place (rows and columns in reverse order): for a square matrix stored in
    row- or column-major order that is its storage read backwards."""
    flat = (A if A.is_contiguous() else A.t()).view(-1)
    n = flat.numel()
    for start in range(0, n // 2, _CHUNK):
        end = min(start + _CHUNK, n // 2)
        head, tail = flat[start:end], flat[n - end : n - start]
        saved = head.clone()
        head.copy_(tail.flip(0))
        tail.copy_(saved.flip(0))


def _invert_upper(R: torch.Tensor) -> None:
    """R ← R⁻¹ in place, R upper triangular with zeros below the diagonal.

    Block column by block column: with R = [[A, B], [0, C]] and A already inverted in place,
    the new column block is [-(A⁻¹B)C⁻¹ ; C⁻¹]."""
    K = R.shape[0]
    for j in range(0, K, _BLOCK):
        b = min(_BLOCK, K - j)
        C = R[j : j + b, j : j + b]
        C_inv = torch.linalg.solve_triangular(C, torch.eye(b, dtype=R.dtype, device=R.device), upper=True)
        if j:
            R[:j, j : j + b] = -(R[:j, :j] @ R[:j, j : j + b]) @ C_inv
        C.copy_(C_inv)
