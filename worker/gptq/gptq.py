"""The GPTQ solver for one linear layer (Frantar et al. 2022, arXiv 2210.17323).

Minimises ||WX - ŴX||² column by column: each column is quantized, and its error, scaled by
the inverse Hessian, is spread over the columns not yet quantized. H = 2XᵀX/n comes from the
layer's calibration inputs. Updates are applied lazily, a block of columns at a time, so the
heavy work is matrix-matrix products. Weights are [out, in] (nn.Linear orientation) throughout.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .config import QuantizeConfig
from .errors import CholeskyError
from .quantizer import dequantize, find_params, quantize


@dataclass
class LayerQuantResult:
    weight: torch.Tensor  # [N, K] float32, dequantized: scales[g_idx] * (codes - zeros)
    codes: torch.Tensor  # [N, K] int32 in [0, maxq], original column order
    scales: torch.Tensor  # [G, N] float32 (fp16-representable)
    zeros: torch.Tensor  # [G, N] int32, the true zero point
    g_idx: torch.Tensor  # [K] int32, group of each input column
    loss: float
    damp_percent: float
    nsamples: int
    seconds: float


class GPTQ:
    """Accumulates the Hessian of one layer's inputs, then quantizes the layer's weight."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight.detach()
        self.rows, self.columns = weight.shape
        # sum of xxᵀ over calibration tokens, fp32; H = 2 * xtx / nsamples
        self.xtx = torch.zeros(self.columns, self.columns, dtype=torch.float32, device=weight.device)
        self.nsamples = 0

    def add_batch(self, inp: torch.Tensor) -> None:
        x = inp.detach().reshape(-1, self.columns).to(self.xtx.device, torch.float32)
        self.xtx.addmm_(x.t(), x)
        self.nsamples += x.shape[0]

    def hessian(self) -> torch.Tensor:
        if self.nsamples == 0:
            raise ValueError("no calibration inputs were recorded for this layer")
        return self.xtx * (2.0 / self.nsamples)

    def free(self) -> None:
        self.xtx = None  # type: ignore[assignment]

    def solve(self, config: QuantizeConfig, *, consume: bool = False) -> LayerQuantResult:
        """consume=True turns the accumulated sums into the Hessian in place and works on the
        weight given to __init__ in place (one K x K and one N x K matrix less at the peak; the
        solver cannot solve again). For callers that pass a weight copy of their own."""
        start = time.perf_counter()
        maxq = config.maxq
        W = self.weight.to(self.xtx.device, torch.float32)
        if consume:  # W may be the very tensor given to __init__: it is worked on in place
            self.weight = None  # type: ignore[assignment]
        else:
            W = W.clone()
        if consume:
            if self.nsamples == 0:
                self.hessian()  # raises
            H = self.xtx.mul_(2.0 / self.nsamples)
            self.xtx = None  # type: ignore[assignment]
        else:
            H = self.hessian()
        K = self.columns
        g = config.group_size if config.group_size != -1 else K

        # inputs that never fire carry no information: pin them, zero their weights
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0

        static = None
        if config.static_groups and config.group_size != -1:
            static = [find_params(W[:, i : i + g], config.bits, config.sym, config.mse) for i in range(0, K, g)]

        perm = None
        if config.desc_act:
            perm = torch.argsort(torch.diag(H), descending=True)
            W = W[:, perm]
            H = H[perm][:, perm]

        Hinv, damp = _inverse_hessian_factor(H, config)
        del H  # not needed below: free it before the per-column work

        codes = torch.zeros_like(W)
        Q = torch.zeros_like(W)
        losses = torch.zeros_like(W)
        scales: list[torch.Tensor] = []
        zeros: list[torch.Tensor] = []
        scale = zero = None
        if config.group_size == -1:
            scale, zero = find_params(W, config.bits, config.sym, config.mse)
            scales.append(scale)
            zeros.append(zero)

        bs = config.block_size
        for i1 in range(0, K, bs):
            i2 = min(i1 + bs, K)
            W1 = W[:, i1:i2].clone()
            Err1 = torch.zeros_like(W1)
            Diff1 = torch.empty_like(W1)  # w - dq per column; the losses come from it per block
            Hinv1 = Hinv[i1:i2, i1:i2]
            with _one_thread():
                for i in range(i2 - i1):
                    col = i1 + i
                    if config.group_size != -1:
                        if static is not None:
                            orig = int(perm[col]) if perm is not None else col
                            scale, zero = static[orig // g]
                        elif col % g == 0:
                            # current values of the group: this block's columns carry the updates
                            # made so far; later blocks' columns have not received them yet
                            group = W1[:, i : i + g]
                            if col + g > i2:
                                group = torch.cat([group, W[:, i2 : col + g]], dim=1)
                            scale, zero = find_params(group, config.bits, config.sym, config.mse)
                            scales.append(scale)
                            zeros.append(zero)
                    w = W1[:, i : i + 1]
                    d = Hinv1[i, i]
                    q = quantize(w, scale, zero, maxq)
                    dq = dequantize(q, scale, zero)
                    codes[:, col : col + 1] = q
                    Q[:, col : col + 1] = dq
                    diff = w - dq
                    Diff1[:, i : i + 1] = diff
                    err = diff / d
                    W1[:, i:] -= err @ Hinv1[i : i + 1, i:]
                    Err1[:, i : i + 1] = err
            # (w - dq)² / d² / 2 for the whole block at once: the same elementwise operations
            losses[:, i1:i2] = Diff1**2 / torch.diagonal(Hinv1) ** 2 / 2
            W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

        if static is not None:
            scales = [s for s, _ in static]
            zeros = [z for _, z in static]
            g_idx = torch.arange(K, device=W.device) // g
        elif config.group_size == -1:
            g_idx = torch.zeros(K, dtype=torch.long, device=W.device)
        else:
            g_idx = torch.arange(K, device=W.device) // g  # group of each (permuted) column

        if perm is not None:
            inv = torch.argsort(perm)
            codes, Q = codes[:, inv], Q[:, inv]
            if static is None:
                g_idx = g_idx[inv]

        return LayerQuantResult(
            weight=Q,
            codes=codes.to(torch.int32),
            scales=torch.cat(scales, dim=1).t().contiguous(),
            zeros=torch.cat(zeros, dim=1).t().to(torch.int32).contiguous(),
            g_idx=g_idx.to(torch.int32),
            loss=float(losses.sum()),
            damp_percent=damp,
            nsamples=self.nsamples,
            seconds=time.perf_counter() - start,
        )


@contextmanager
def _one_thread() -> Iterator[None]:
    """The per-column steps are many tiny operations: on one thread they never wait for the
    others (on a busy 2-core machine 15x faster, on an idle one 25% slower); they are
    elementwise or have an inner dimension of 1, so the results are bit-identical."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _inverse_hessian_factor(H: torch.Tensor, config: QuantizeConfig) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + λI)⁻¹, with λ = damp * mean(diag H).

    Raises the damping by config.damp_auto_increment until the factorisation succeeds.
    """
    mean_diag = torch.mean(torch.diag(H))
    damp = config.damp_percent
    while True:
        Hd = H.clone()
        Hd.diagonal().add_(damp * mean_diag)
        L, info = torch.linalg.cholesky_ex(Hd)
        del Hd  # each step frees its input: at most three K x K matrices at a time
        if info == 0:
            inverse = torch.cholesky_inverse(L)
            del L
            U, info = torch.linalg.cholesky_ex(inverse, upper=True)
            del inverse
            if info == 0 and torch.isfinite(U).all():
                return U, round(damp, 6)
        damp += config.damp_auto_increment
        if damp > config.max_damp_percent or not math.isfinite(float(mean_diag)):
            raise CholeskyError(
                f"Cholesky factorisation failed even with damp_percent={damp:.4f}: the "
                "calibration inputs of this layer are degenerate; use more or more varied "
                "calibration samples, or a larger damp_percent"
            )


def rtn_quantize(weight: torch.Tensor, config: QuantizeConfig) -> LayerQuantResult:
    """Round-to-nearest with the same groups: the baseline GPTQ is measured against."""
    start = time.perf_counter()
    W = weight.detach().float()
    K = W.shape[1]
    g = config.group_size if config.group_size != -1 else K
    scales, zeros, codes, Q = [], [], torch.zeros_like(W), torch.zeros_like(W)
    for i in range(0, K, g):
        scale, zero = find_params(W[:, i : i + g], config.bits, config.sym, config.mse)
        q = quantize(W[:, i : i + g], scale, zero, config.maxq)
        codes[:, i : i + g] = q
        Q[:, i : i + g] = dequantize(q, scale, zero)
        scales.append(scale)
        zeros.append(zero)
    return LayerQuantResult(
        weight=Q,
        codes=codes.to(torch.int32),
        scales=torch.cat(scales, dim=1).t().contiguous(),
        zeros=torch.cat(zeros, dim=1).t().to(torch.int32).contiguous(),
        g_idx=(torch.arange(K, device=W.device) // g).to(torch.int32),
        loss=0.0,
        damp_percent=0.0,
        nsamples=0,
        seconds=time.perf_counter() - start,
    )
