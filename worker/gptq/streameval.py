"""Perplexity measured while a model is streamed block by block.

A run that reads the model block by block never holds the whole model, so it cannot run it
on the evaluation windows the usual way (evaluate.window_perplexity). The windows ride along
instead (pipeline.Passengers): their hidden states enter block 0 with the calibration's, go
through each block before it is quantized (the original model's states) and after (the
quantized model's), and at the end the model's own forward, with the blocks standing in for
what they computed, turns both into logits. The same windows, batches and arithmetic as
window_perplexity on the whole model: the same numbers, at one block's memory.
`streamed_perplexity` does the same for a model that is only scored (`gptqd eval`).

Both streams' last states also give how far the quantized model's next-token distributions
moved from the original's (evaluate.Divergence: KL and top-1 agreement). A run that holds the
whole model scores it whole (whole_model_scores) and keeps the original's last states from
before quantizing for the same comparison: the same numbers either way.

Greedy samples cannot ride along: every new token needs every block once more.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from worker.gptq.arch import ArchSpec, get_arch
from worker.gptq.evaluate import (
    Divergence,
    check_fits,
    logits_batch,
    model_logits,
    token_nll,
    window_perplexity,
)
from worker.gptq.lazyload import LazyModel
from worker.gptq.memory import trim
from worker.gptq.pipeline import BlockCall, capture_inputs, logits_after_blocks, run_block
from worker.gptq.progress import StepCallback

ORIGINAL, QUANTIZED = "before", "after"


class EvalPassengers:
    """The evaluation windows' hidden states through the blocks: for each stream, the
    original blocks ("before") or the quantized ones ("after")."""

    def __init__(self, windows: torch.Tensor, batch_size: int,
                 streams: tuple[str, ...] = (ORIGINAL, QUANTIZED)) -> None:
        self.windows = windows
        self.batches = windows.split(batch_size)
        self.calls: list[list[BlockCall]] = []
        self.streams = streams
        self.states_of: dict[str, list[torch.Tensor]] = {}

    # --- pipeline.Passengers -------------------------------------------------------------

    def capture(self, model: nn.Module, arch: ArchSpec, device: torch.device) -> None:
        hidden, self.calls = capture_inputs(model, arch, self.batches, device)
        self.states_of = {stream: list(hidden) for stream in self.streams}

    def through(self, index: int, block: nn.Module, quantized: bool) -> None:
        stream = QUANTIZED if quantized else ORIGINAL
        if stream in self.states_of:
            self.states_of[stream] = run_block(block, self.states_of[stream], self.calls[index])

    def states(self) -> list[torch.Tensor]:
        return [t for stream in self.streams for t in self.states_of[stream]]

    def restore(self, states: list[torch.Tensor]) -> None:
        n = len(self.batches)
        if len(states) != len(self.streams) * n:
            raise ValueError(f"expected {len(self.streams) * n} saved evaluation states, found {len(states)}")
        self.states_of = {stream: list(states[i * n:(i + 1) * n]) for i, stream in enumerate(self.streams)}

    # --- the scores ------------------------------------------------------------------------

    @torch.inference_mode()
    def scores(self, lazy: LazyModel, device: torch.device) -> dict[str, float]:
        """Each stream's perplexity ({"before", "after"}) and, with both streams, how far the
        quantized model's distributions are from the original's (Divergence.summary), once
        every block is done: the final norm and head are read for it, then let go."""
        model, arch = lazy.model, lazy.arch
        nll = dict.fromkeys(self.states_of, 0.0)
        divergence = Divergence() if len(self.states_of) == 2 else None
        lazy.load_outside_blocks(head=True)
        try:
            for index, ids in enumerate(self.batches):
                logits = {stream: logits_after_blocks(model, arch, ids, states[index], device)
                          for stream, states in self.states_of.items()}
                for stream, batch_logits in logits.items():
                    nll[stream] += token_nll(batch_logits, ids)
                if divergence is not None:
                    divergence.add(logits[ORIGINAL], logits[QUANTIZED])
                del logits
        finally:
            lazy.release_outside_blocks()
        tokens = self.windows.shape[0] * (self.windows.shape[1] - 1)
        scores = {stream: math.exp(total / tokens) for stream, total in nll.items()}
        return {**scores, **(divergence.summary() if divergence is not None else {})}


@dataclass
class WholeScores:
    """A whole model's perplexity on the windows, with what its last block output for each
    batch (kept on the CPU when asked: the original's, to compare the quantized model with)
    and, given such states, Divergence.summary() against them."""

    perplexity: float
    states: list[torch.Tensor] = field(default_factory=list)
    divergence: dict[str, float] | None = None


def whole_model_scores(model: nn.Module, arch: ArchSpec, windows: torch.Tensor, *,
                       keep_states: bool = False, original: list[torch.Tensor] | None = None,
                       on_step: StepCallback | None = None) -> WholeScores:
    """window_perplexity of a model held whole (the same batches and arithmetic); keep_states
    keeps its last block's outputs; original (another run's kept states) turns them into the
    original's logits (logits_after_blocks: this model's own norm and head, which quantizing
    leaves alone) for the divergence. on_step hears each batch done (i of n)."""
    check_fits(model, windows.shape[1])
    batches = windows.split(logits_batch(model, windows.shape[1]))
    kept: list[torch.Tensor] = []

    def keep(_module: nn.Module, _args: Any, out: Any) -> None:
        kept.append((out[0] if isinstance(out, tuple | list) else out).to("cpu"))

    # outside inference mode: the first arch.blocks() of a mixture makes its expert linears
    hook = arch.blocks(model)[-1].register_forward_hook(keep) if keep_states else None
    divergence = Divergence() if original is not None else None
    nll = 0.0
    try:
        with torch.inference_mode():
            for index, batch in enumerate(batches, 1):
                logits = model_logits(model, batch)
                nll += token_nll(logits, batch)
                if divergence is not None:
                    device = logits.device
                    before = logits_after_blocks(model, arch, batch, original[index - 1].to(device), device)
                    divergence.add(before, logits)
                del logits
                if on_step is not None:
                    on_step(index, len(batches))
    finally:
        if hook is not None:
            hook.remove()
    return WholeScores(math.exp(nll / (windows.shape[0] * (windows.shape[1] - 1))), kept,
                       divergence.summary() if divergence is not None else None)


@torch.inference_mode()
def _streamed(lazy: LazyModel, windows: torch.Tensor, device: torch.device,
              on_step: StepCallback | None = None) -> EvalPassengers:
    """The windows carried through every block of a lazily loaded model (an original one, or
    a GPTQ checkpoint: lazycheckpoint.py), one block in memory at a time; on_step hears each
    block done (i of n)."""
    model, arch = lazy.model, lazy.arch
    passengers = EvalPassengers(windows, logits_batch(model, windows.shape[1]), streams=(ORIGINAL,))
    passengers.capture(model, arch, device)
    lazy.release_outside_blocks()
    blocks = arch.blocks(model)
    for index, block in enumerate(blocks):
        lazy.load_block(index, block)
        block.to(device)
        passengers.through(index, block, quantized=False)
        block.to("meta")  # parameters and buffers (a checkpoint's packed layers) let go
        trim()
        if on_step is not None:
            on_step(index + 1, len(blocks))
    lazy.close()  # no read ahead of a block after the last
    return passengers


def streamed_perplexity(lazy: LazyModel, windows: torch.Tensor, device: torch.device,
                        on_step: StepCallback | None = None) -> float:
    """window_perplexity of a lazily loaded model, reading one block at a time (the same
    number); on_step hears each block done (i of n)."""
    return _streamed(lazy, windows, device, on_step).scores(lazy, device)[ORIGINAL]


def perplexity_of(model: nn.Module, lazy: LazyModel | None, windows: torch.Tensor,
                  device: torch.device, on_step: StepCallback | None = None) -> float:
    """window_perplexity of a model held whole (lazy None: on_step hears batches) or read
    block by block (lazy: blocks)."""
    if lazy is not None:
        return streamed_perplexity(lazy, windows, device, on_step)
    return window_perplexity(model, windows, on_step=on_step)


@dataclass
class Held:
    """A model to score: held whole (lazy None) or read block by block (lazy)."""

    model: nn.Module
    lazy: LazyModel | None

    @property
    def arch(self) -> ArchSpec:
        return self.lazy.arch if self.lazy is not None else get_arch(self.model)


def last_states(held: Held, windows: torch.Tensor, device: torch.device,
                on_step: StepCallback | None = None) -> list[torch.Tensor]:
    """What the model's last block outputs for each batch of windows (logits_batch's), on the
    CPU: one whole forward per batch, or the windows carried block by block."""
    if held.lazy is None:
        return whole_model_scores(held.model, held.arch, windows, keep_states=True,
                                  on_step=on_step).states
    passengers = _streamed(held.lazy, windows, device, on_step)
    return [states.to("cpu") for states in passengers.states_of[ORIGINAL]]


@torch.inference_mode()
def compare_models(reference: Held, candidate: Held, windows: torch.Tensor,
                   states: tuple[list[torch.Tensor], list[torch.Tensor]],
                   device: torch.device) -> dict[str, float]:
    """Both models' perplexities and how far the candidate's next-token distributions are from
    the reference's (Divergence.summary), from what each one's last block output (last_states);
    each model's own final norm and head make its logits, the same numbers its perplexity
    alone gives."""
    models = (reference, candidate)
    nll = [0.0, 0.0]
    divergence = Divergence()
    for held in models:
        if held.lazy is not None:
            held.lazy.load_outside_blocks(head=True)
    try:
        for index, ids in enumerate(windows.split(logits_batch(candidate.model, windows.shape[1]))):
            logits = [logits_after_blocks(held.model, held.arch, ids, kept[index].to(device), device)
                      for held, kept in zip(models, states, strict=True)]
            for which, batch_logits in enumerate(logits):
                nll[which] += token_nll(batch_logits, ids)
            divergence.add(*logits)
            del logits
    finally:
        for held in models:
            if held.lazy is not None:
                held.lazy.release_outside_blocks()
    tokens = windows.shape[0] * (windows.shape[1] - 1)
    return {"reference_perplexity": math.exp(nll[0] / tokens), "perplexity": math.exp(nll[1] / tokens),
            **divergence.summary()}
