"""A model read to be scored (`gptqd eval`, a verification), and one model scored against
another on the same windows.

A GPTQ checkpoint is read through our loader (residency.open_checkpoint); an original model
block by block when its weights are safetensors (the same numbers in one block's memory), else
whole through transformers. Two models compare only over one vocabulary on the same token
ids: check_same_tokens refuses any other pair before either is scored.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from worker.gptq.download import OnTransfer
from worker.gptq.errors import EngineError
from worker.gptq.streameval import Held


class IncomparableModels(EngineError):
    code = "incomparable_models"


@dataclass
class Opened:
    """A model ready to score: held whole or block by block, its tokenizer (None when it has
    no tokenizer files), what it is ("quantized" or "original") and, for a checkpoint read
    block by block although samples were wanted, why."""

    held: Held
    tokenizer: Any
    kind: str
    why: str = ""


def open_for_scoring(model: str, compute: torch.device, *, trust_remote_code: bool = False,
                     revision: str | None = None, token: str | None = None,
                     on_transfer: OnTransfer | None = None, samples: bool = False,
                     share: float | None = None) -> Opened:
    """The model (a directory or a hub id) on compute, in the dtype a run uses there;
    on_transfer hears a hub model's download. A checkpoint is held whole only when samples are
    wanted and it takes at most share of the free memory (residency.open_checkpoint)."""
    from worker.gptq.api import open_streamed
    from worker.gptq.loader import is_quantized_dir
    from worker.gptq.modelio import compute_dtype, load_config, load_model
    from worker.gptq.residency import WHOLE_MODEL_SHARE, open_checkpoint

    path = Path(model).expanduser()
    if path.is_dir() and is_quantized_dir(path):
        held = open_checkpoint(path, compute, WHOLE_MODEL_SHARE if share is None else share,
                               samples=samples, trust_remote_code=trust_remote_code)
        return Opened(Held(held.model, held.lazy), held.tokenizer, "quantized", held.why)
    config, arch = load_config(model, revision=revision, token=token, trust_remote_code=trust_remote_code)
    common = {"revision": revision, "token": token, "trust_remote_code": trust_remote_code}
    streamed, _ = open_streamed(model, config, arch, compute, common, on_transfer)
    if streamed is not None:
        return Opened(Held(streamed.model, streamed.lazy), streamed.tokenizer, "original")
    result = load_model(model, config=config, dtype=compute_dtype(config, compute), **common)
    return Opened(Held(result.model.to(compute), None), result.tokenizer, "original")


def check_same_tokens(model: str, reference: str, opened: Opened, other: Opened,
                      texts: list[str], windows: torch.Tensor) -> None:
    """IncomparableModels unless both models have one vocabulary and the reference's tokenizer
    cuts the text into the same windows of token ids."""
    from worker.gptq.evaluate import eval_windows

    sizes = [getattr(getattr(o.held.model, "config", None), "vocab_size", None) for o in (opened, other)]
    same = sizes[0] == sizes[1] and other.tokenizer is not None
    if same:
        theirs = eval_windows(other.tokenizer, texts, windows.shape[1], windows.shape[0])
        same = theirs.shape == windows.shape and bool((theirs == windows).all())
    if not same:
        raise IncomparableModels(
            f"{reference} does not share {model}'s tokenizer (vocabularies of {sizes[1]} and "
            f"{sizes[0]} tokens, or other token ids for the text): their next-token "
            "distributions cannot be compared")


def score_against(run: Any, held: Held, reference: Held, windows: torch.Tensor,
                  compute: torch.device, what: str) -> dict[str, float]:
    """streameval.compare_models of held against reference, each one's pass over the windows
    a stage of run (api.RunProgress with COMPARING_STAGE_ENDS); what names the reference in
    its stage's message."""
    from worker.gptq.streameval import compare_models, last_states

    with run.stage("evaluating"):
        states = last_states(held, windows, compute,
                             run.steps("evaluating", "block" if held.lazy else "batch"))
    with run.stage("evaluating", "evaluating_reference", message=what):
        kept = last_states(reference, windows, compute,
                           run.steps("evaluating", "block" if reference.lazy else "batch",
                                     "evaluating_reference", with_eta=True))
        return compare_models(reference, held, windows, (kept, states), compute)
