"""Perplexity of the original and of the quantized model, measured during a streamed run.

A run that reads the model block by block never holds the whole model, so it cannot run it
on the evaluation windows the usual way (evaluate.window_perplexity). The windows ride along
instead (pipeline.Passengers): their hidden states enter block 0 with the calibration's, go
through each block before it is quantized (the original model's states) and after (the
quantized model's), and at the end the model's own forward, with the blocks standing in for
what they computed, turns both into logits. The same windows, batches and arithmetic as
window_perplexity on the whole model: the same numbers, at one block's memory.

Greedy samples cannot ride along: every new token needs every block once more.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from worker.gptq.arch import ArchSpec
from worker.gptq.evaluate import token_nll
from worker.gptq.pipeline import BlockCall, capture_inputs, logits_after_blocks, run_block


class EvalPassengers:
    """The evaluation windows' hidden states through the original and the quantized blocks."""

    def __init__(self, windows: torch.Tensor, batch_size: int) -> None:
        self.windows = windows
        self.batches = windows.split(batch_size)
        self.calls: list[list[BlockCall]] = []
        self.original: list[torch.Tensor] = []
        self.quantized: list[torch.Tensor] = []

    # --- pipeline.Passengers -------------------------------------------------------------

    def capture(self, model: nn.Module, arch: ArchSpec, device: torch.device) -> None:
        hidden, self.calls = capture_inputs(model, arch, self.batches, device)
        self.original, self.quantized = list(hidden), list(hidden)

    def through(self, index: int, block: nn.Module, quantized: bool) -> None:
        if quantized:
            self.quantized = run_block(block, self.quantized, self.calls[index])
        else:
            self.original = run_block(block, self.original, self.calls[index])

    def states(self) -> list[torch.Tensor]:
        return [*self.original, *self.quantized]

    def restore(self, states: list[torch.Tensor]) -> None:
        n = len(self.batches)
        if len(states) != 2 * n:
            raise ValueError(f"expected {2 * n} saved evaluation states, found {len(states)}")
        self.original, self.quantized = list(states[:n]), list(states[n:])

    # --- the scores ------------------------------------------------------------------------

    @torch.inference_mode()
    def perplexities(self, model: nn.Module, arch: ArchSpec, device: torch.device) -> dict[str, float]:
        """{"before", "after"}: once every block is done; needs what lies after the blocks
        (final norm, head) loaded."""
        tokens = self.windows.shape[0] * (self.windows.shape[1] - 1)
        return {
            when: math.exp(sum(token_nll(logits_after_blocks(model, arch, ids, last, device), ids)
                               for ids, last in zip(self.batches, states, strict=True)) / tokens)
            for when, states in (("before", self.original), ("after", self.quantized))
        }
