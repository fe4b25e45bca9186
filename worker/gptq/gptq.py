"""The GPTQ solver for one linear layer (Frantar et al. 2022, arXiv 2210.17323).

Minimises ||WX - ŴX||² column by column: each column is quantized, and its error, scaled by
the inverse Hessian, is spread over the columns not yet quantized. H = 2XᵀX/n comes from the
layer's calibration inputs. Updates are applied lazily, a block of columns at a time, so the
heavy work is matrix-matrix products. Weights come and go as [out, in] (nn.Linear orientation);
the column loop itself runs on the transpose, where a column is a contiguous row.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .config import QuantizeConfig
from .linalg import inverse_hessian_factor
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
        """Drop the sums and the weight (a solver outlives its solve in the caller's loop)."""
        self.xtx = None  # type: ignore[assignment]
        self.weight = None  # type: ignore[assignment]

    def solve(self, config: QuantizeConfig, *, consume: bool = False) -> LayerQuantResult:
        """consume=True turns the accumulated sums into the Hessian in place (one K x K matrix
        less at the peak; the solver cannot solve again). The weight given to __init__ is
        never modified."""
        start = time.perf_counter()
        maxq = config.maxq
        if consume:
            if self.nsamples == 0:
                self.hessian()  # raises
            H = self.xtx.mul_(2.0 / self.nsamples)
            self.xtx = None  # type: ignore[assignment]
        else:
            H = self.hessian()
        K = self.columns
        g = config.group_size if config.group_size != -1 else K

        # inputs that never fire carry no information: pin them, zero their weights (below)
        dead = torch.diag(H) == 0
        H[dead, dead] = 1

        perm = None
        if config.desc_act:
            perm = torch.argsort(torch.diag(H), descending=True)
            H = H[perm]  # two steps: the unpermuted H is freed before the second copy
            H = H[:, perm]

        box = [H]
        del H  # the factorisation frees it as soon as it has its factor
        Hinv, damp = inverse_hessian_factor(
            box, config.damp_percent, config.damp_auto_increment, config.max_damp_percent
        )

        # the column loop works on Wᵀ: column j of W is row j here, a contiguous vector, and the
        # rank-1 updates touch contiguous rows (3-5x faster than strided columns). Made after
        # the factorisation, whose two K x K matrices are the solver's peak.
        Wt = self.weight.t().to(Hinv.device, torch.float32, copy=True, memory_format=torch.contiguous_format)
        if consume:
            self.weight = None  # type: ignore[assignment]
        Wt[dead] = 0

        static = None
        if config.static_groups and config.group_size != -1:
            static = [_row_params(Wt[i : i + g], config) for i in range(0, K, g)]
        if perm is not None:
            Wt = Wt[perm]

        codes = torch.empty(Wt.shape, dtype=torch.uint8, device=Wt.device)  # maxq <= 255
        Q = torch.empty_like(Wt)
        loss = torch.zeros((), dtype=torch.float64, device=Wt.device)
        scales: list[torch.Tensor] = []
        zeros: list[torch.Tensor] = []
        scale = zero = None
        if config.group_size == -1:
            scale, zero = _row_params(Wt, config)
            scales.append(scale)
            zeros.append(zero)

        bs = config.block_size
        for i1 in range(0, K, bs):
            i2 = min(i1 + bs, K)
            W1 = Wt[i1:i2]  # a view: updates land in Wt, so a group reaching past i2 sees them
            Err1 = torch.empty_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            with _one_thread():
                for i in range(i2 - i1):
                    col = i1 + i
                    if static is not None:
                        orig = int(perm[col]) if perm is not None else col
                        scale, zero = static[orig // g]
                    elif config.group_size != -1 and col % g == 0:
                        # current values of the group: its columns carry the updates made so far
                        scale, zero = _row_params(Wt[col : col + g], config)
                        scales.append(scale)
                        zeros.append(zero)
                    w = W1[i]
                    q = quantize(w, scale, zero, maxq)
                    codes[col] = q
                    dq = torch.mul(q - zero, scale, out=Q[col])
                    err = torch.sub(w, dq, out=Err1[i]).div_(Hinv1[i, i])
                    W1[i + 1 :].addr_(Hinv1[i, i + 1 :], err, alpha=-1)
            # loss = Σ (w - dq)² / d² / 2 = Σ err² / 2
            loss += Err1.double().pow(2).sum() / 2
            Wt[i2:].addmm_(Hinv[i1:i2, i2:].t(), Err1, alpha=-1)
        del Wt, Hinv, W1, Hinv1, Err1  # the views too, or the last ones keep Wt and Hinv alive

        if static is not None:
            scales = [s for s, _ in static]
            zeros = [z for _, z in static]
            g_idx = torch.arange(K, device=Q.device) // g
        elif config.group_size == -1:
            g_idx = torch.zeros(K, dtype=torch.long, device=Q.device)
        else:
            g_idx = torch.arange(K, device=Q.device) // g  # group of each (permuted) column

        if perm is not None:
            inv = torch.argsort(perm)
            codes, Q = codes[inv], Q[inv]
            if static is None:
                g_idx = g_idx[inv]
        Q = Q.t().contiguous()

        return LayerQuantResult(
            weight=Q,
            codes=codes.t().contiguous().to(torch.int32),  # transposed as uint8: 4x less to copy
            scales=torch.stack(scales),
            zeros=torch.stack(zeros).to(torch.int32),
            g_idx=g_idx.to(torch.int32),
            loss=float(loss),
            damp_percent=damp,
            nsamples=self.nsamples,
            seconds=time.perf_counter() - start,
        )


def _row_params(rows: torch.Tensor, config: QuantizeConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero of each output channel, from columns given as rows of Wᵀ: two [N] vectors."""
    scale, zero = find_params(rows.t(), config.bits, config.sym, config.mse)
    return scale.reshape(-1), zero.reshape(-1)


@contextmanager
def _one_thread() -> Iterator[None]:
    """The per-column steps are many small operations: on one thread they never wait for the
    others (on a busy 2-core machine 15x faster; on an idle one, with the contiguous rows of
    Wᵀ, within 10% either way); they are elementwise or have an inner dimension of 1, so the
    results do not depend on the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


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
