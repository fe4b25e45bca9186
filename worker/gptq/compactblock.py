"""A streamed block's linear weights held small while the block is quantized (CPU).

On the CPU the forward passes run in fp32, but a block's weights need not sit in fp32 the whole
time: a linear not yet solved keeps the checkpoint's dtype (fp16/bf16: half the bytes), and a
solved one only its uint8 codes and group parameters (a quarter). A forward pre-hook makes the
fp32 weight just before the linear runs and a forward hook drops it afterwards. The values are
exactly the fp32 path's: fp16/bf16 -> fp32 is exact, and scales[g] * (codes - zeros[g]) is the
solver's own arithmetic for its dequantized weight; the checkpoint is bit-identical
(tests/integration/test_lazy_memory.py). On a TinyLlama-shaped block this is ~120 MiB less at
the peak (the down_proj solve, when every other linear of the block is solved).

A weight made fp32 is kept for the rest of the pass over the calibration batches (or the
evaluation windows) and dropped when the pass ends (pass_done(), before any solve): made anew
for every batch, it cost a fifth of the forward stage (a Llama h1024 at 2048 tokens a call).
Up to PASS_BYTES of them, in the order the pass first runs them (a TinyLlama block is 176 MiB
in fp32; a Mixtral block's experts would be 5.6 GiB): past that, made per call as before.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .arch import is_conv1d
from .gptq import LayerQuantResult

_COLUMNS = 512  # columns dequantized at a time: bounds the temporaries to N x 512
PASS_BYTES = 256 << 20  # fp32 weights kept through a pass


class CompactLinears:
    """Hooks on a block's linears; solved() swaps a linear's weight for its codes."""

    def __init__(self, linears: Mapping[str, nn.Module], compute_dtype: torch.dtype) -> None:
        self.compute_dtype = compute_dtype
        self._held: dict[nn.Module, nn.Parameter] = {}  # what the module holds between calls
        self._codes: dict[nn.Module, tuple[torch.Tensor, ...]] = {}
        self._made: dict[nn.Module, nn.Parameter] = {}  # fp32 weights of the pass under way
        self._handles = []
        for module in linears.values():
            self._held[module] = module.weight
            self._handles.append(module.register_forward_pre_hook(self._materialize))
            self._handles.append(module.register_forward_hook(self._drop))

    def solved(self, module: nn.Module, layer: LayerQuantResult) -> None:
        """From now on the module's weight is made from the layer's codes (its stored weight
        is dropped; a meta tensor of the same shape stands in for it)."""
        self._made.pop(module, None)
        self._codes[module] = (layer.codes.to(torch.uint8), layer.scales.float(),
                               layer.zeros.float(), layer.g_idx.long())
        placeholder = nn.Parameter(torch.empty(module.weight.shape, device="meta"), requires_grad=False)
        self._held[module] = module._parameters["weight"] = placeholder

    def pass_done(self) -> None:
        """The pass over the batches has ended: drop the fp32 weights made for it."""
        self._made.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._codes.clear()
        self._made.clear()

    def _materialize(self, module: nn.Module, args: Any) -> None:
        made = self._made.get(module)
        if made is None:
            made = nn.Parameter(self._weight(module), requires_grad=False)
            kept = sum(p.nbytes for p in self._made.values())
            if kept + made.nbytes <= PASS_BYTES:
                self._made[module] = made
        module._parameters["weight"] = made

    def _drop(self, module: nn.Module, args: Any, output: Any) -> None:
        module._parameters["weight"] = self._held[module]

    def _weight(self, module: nn.Module) -> torch.Tensor:
        packed = self._codes.get(module)
        if packed is None:
            return self._held[module].detach().to(self.compute_dtype, copy=True)
        codes, scales, zeros, g_idx = packed
        N, K = codes.shape
        weight = torch.empty(N, K, dtype=torch.float32, device=codes.device)
        for start in range(0, K, _COLUMNS):
            cols = slice(start, min(start + _COLUMNS, K))
            g = g_idx[cols]
            # (q - zero) * scale, as the solver computed its dequantized weight
            torch.mul(codes[:, cols].float() - zeros[g].t(), scales[g].t(), out=weight[:, cols])
        if is_conv1d(module):
            weight = weight.t().contiguous()  # Conv1D keeps [in, out]
        return weight.to(self.compute_dtype)
