"""How much a quantized model lost: perplexity, agreement with the original, sample text.

Perplexity protocol (the GPTQ paper's, fixed so numbers are comparable across runs):
the texts are joined with "\\n\\n" and tokenized once, without special tokens; the token stream
is cut into non-overlapping windows of seq_length tokens (a trailing partial window is dropped);
each window is scored on its own, with no context carried over; perplexity is exp of the mean
negative log-likelihood over every predicted token (seq_length - 1 per window).
A plain-text file (.txt, .raw, any name but .jsonl/.json/.parquet) counts as one text, read as
it is (see load_texts): on wikitext-2's test.txt this reproduces the perplexity the fixture's
trainer measured.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .arch import get_arch, get_weight, set_weight
from .calibration import (
    BUILTIN_FILES,
    RECORD_SUFFIXES,
    builtin_rows,
    check_file,
    hub_rows,
    looks_like_file,
    read_file_rows,
    read_text,
    tokenize,
)
from .config import QuantizeConfig, context_limit
from .gptq import rtn_quantize
from .pipeline import PipelineResult
from .progress import StepCallback

DEFAULT_PROMPTS = ("Once upon a time", "The meaning of life is")


@dataclass(frozen=True)
class EvalSpec:
    """What to measure after quantizing.

    source: held-out text, in the same forms as CalibrationSpec.source ("builtin-heldout", a local
    .txt/.jsonl/.parquet file, or a hub dataset "NAME[:CONFIG[:SPLIT]]"). Keep it apart from
    the calibration text, or the perplexity flatters the quantized model.
    """

    source: str
    text_field: str = "text"
    seq_length: int = 512
    max_windows: int | None = None
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    max_new_tokens: int = 32
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.source:
            raise ValueError("eval source must not be empty")
        if self.seq_length < 2:
            raise ValueError(f"eval seq_length must be >= 2, got {self.seq_length}")
        if self.max_windows is not None and self.max_windows < 1:
            raise ValueError(f"eval max_windows must be >= 1, got {self.max_windows}")
        if self.max_new_tokens < 0:
            raise ValueError(f"eval max_new_tokens must be >= 0, got {self.max_new_tokens}")


def load_texts(source: str, text_field: str = "text") -> list[str]:
    """The texts of an eval source, kept as they are (no stripping, blank rows kept).

    A .txt file is one text, its layout untouched; the rows of a .jsonl/.parquet file, of a hub
    dataset or of the builtin text are separate texts, which the protocol joins with "\n\n" (how
    the GPTQ paper joins wikitext's rows).
    """
    if source in BUILTIN_FILES:
        return builtin_rows(source)
    if looks_like_file(source):
        path = Path(source).expanduser()
        if path.suffix.lower() in RECORD_SUFFIXES:
            return read_file_rows(path, text_field, "eval text")
        check_file(path, "eval text")
        return [read_text(path, "eval text")]
    return hub_rows(source, text_field)


def context_length(model: torch.nn.Module) -> int | None:
    """The longest input the model's position embeddings admit, when its config says."""
    return context_limit(getattr(model, "config", None))


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def eval_windows(
    tokenizer, texts: str | Sequence[str], seq_length: int, max_windows: int | None = None
) -> torch.Tensor:
    """The protocol's windows: [n_windows, seq_length] token ids (long)."""
    text = texts if isinstance(texts, str) else "\n\n".join(texts)
    ids = tokenize(tokenizer, text)
    n = ids.numel() // seq_length
    if n == 0:
        raise ValueError(
            f"eval text has {ids.numel()} tokens, fewer than one window of seq_length={seq_length}"
        )
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[: n * seq_length].view(n, seq_length)


def check_fits(model: torch.nn.Module, seq_length: int) -> None:
    """ValueError when windows of seq_length exceed the model's context length."""
    limit = context_length(model)
    if limit is not None and seq_length > limit:
        raise ValueError(f"seq_length={seq_length} exceeds the model's context length {limit}")


# one forward's fp32 logits at most this big (the loss makes one more such copy): with a
# 128k vocabulary 8 windows of 512 tokens would be 2.1 GB, beside a model that fills the card
LOGITS_BYTES = 1 << 30


def logits_batch(model: torch.nn.Module, seq_length: int, most: int = 8) -> int:
    """How many windows of seq_length one forward may score within LOGITS_BYTES (at least 1)."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 1
    return max(1, min(most, LOGITS_BYTES // (seq_length * vocab * 4)))


@torch.inference_mode()
def model_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids.to(_model_device(model)), use_cache=False)
    return out.logits.float()


def perplexity(
    model: torch.nn.Module,
    tokenizer,
    texts: str | Sequence[str],
    seq_length: int,
    max_windows: int | None = None,
    batch_size: int | None = None,
) -> float:
    """Perplexity of `model` on `texts` under the module's protocol."""
    check_fits(model, seq_length)
    return window_perplexity(model, eval_windows(tokenizer, texts, seq_length, max_windows), batch_size)


@torch.inference_mode()
def window_perplexity(model: torch.nn.Module, windows: torch.Tensor, batch_size: int | None = None,
                      on_step: StepCallback | None = None) -> float:
    """exp(mean NLL) over every predicted token of windows ([n, seq_length] long), each scored
    alone; batch_size windows per forward (default: logits_batch); on_step hears each batch
    done (i of n)."""
    check_fits(model, windows.shape[1])
    batches = windows.split(batch_size or logits_batch(model, windows.shape[1]))
    nll = 0.0
    for index, batch in enumerate(batches, 1):
        nll += token_nll(model_logits(model, batch), batch)
        if on_step is not None:
            on_step(index, len(batches))
    return math.exp(nll / (windows.shape[0] * (windows.shape[1] - 1)))


def token_nll(logits: torch.Tensor, windows: torch.Tensor) -> float:
    """The summed NLL of every token of windows ([B, T]) after the first, from the logits
    computed on them ([B, T, V])."""
    targets = windows[:, 1:].to(logits.device)
    return float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                 reduction="sum"))


class Divergence:
    """How far a quantized model's next-token distributions are from the original's, summed
    as batches of logits come: KL(original ‖ quantized) in nats and how often the two top-1
    tokens agree, averaged over every position (the finer measures of what quantizing lost:
    perplexity can stay put while the distributions move). Sums stay on the logits' device
    until summary(): no host sync per batch."""

    def __init__(self) -> None:
        self._kl: torch.Tensor | float = 0.0
        self._same: torch.Tensor | int = 0
        self.positions = 0

    def add(self, original: torch.Tensor, quantized: torch.Tensor) -> None:
        """original, quantized: [B, T, V] logits on the same windows."""
        for ref, q in zip(original, quantized, strict=True):  # a window at a time: [T, V] copies
            ref = F.log_softmax(ref.float(), dim=-1)
            q = F.log_softmax(q.float().to(ref.device), dim=-1)
            self._kl = self._kl + F.kl_div(q, ref, log_target=True, reduction="sum")
            self._same = self._same + (ref.argmax(-1) == q.argmax(-1)).sum()
            self.positions += ref.shape[0]

    def summary(self) -> dict[str, float]:
        """{"kl_divergence": mean nats per position, "top1_agreement": fraction of positions}."""
        return {"kl_divergence": float(self._kl) / self.positions,
                "top1_agreement": int(self._same) / self.positions}


@torch.inference_mode()
def agreement(
    ref_model: torch.nn.Module,
    q_model: torch.nn.Module,
    input_ids: torch.Tensor,
    batch_size: int | None = None,
) -> dict[str, float]:
    """How often the quantized model's top-1 token equals the original's ("top1"), and
    KL(ref ‖ quantized) ("kl", nats), averaged over every position of input_ids ([B, T] long)."""
    divergence = Divergence()
    for batch in input_ids.split(batch_size or logits_batch(ref_model, input_ids.shape[1])):
        divergence.add(model_logits(ref_model, batch), model_logits(q_model, batch))
    summary = divergence.summary()
    return {"top1": summary["top1_agreement"], "kl": summary["kl_divergence"]}


@torch.inference_mode()
def generate_samples(
    model: torch.nn.Module, tokenizer, prompts: Sequence[str], max_new_tokens: int
) -> list[str]:
    """Greedy continuations, returned as prompt + continuation."""
    samples = []
    device = _model_device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
        )
        samples.append(tokenizer.decode(out[0], skip_special_tokens=True))
    return samples


def evaluate_model(model: torch.nn.Module, tokenizer, spec: EvalSpec) -> dict:
    """Perplexity on the spec's text and greedy samples: what a report shows for one model."""
    texts = load_texts(spec.source, spec.text_field)
    check_fits(model, spec.seq_length)
    windows = eval_windows(tokenizer, texts, spec.seq_length, spec.max_windows)
    return {
        "perplexity": window_perplexity(model, windows),
        "windows": int(windows.shape[0]),
        "seq_length": spec.seq_length,
        "samples": generate_samples(model, tokenizer, spec.prompts, spec.max_new_tokens)
        if spec.max_new_tokens > 0
        else [],
    }


def rtn_quantize_model(model: torch.nn.Module, config: QuantizeConfig) -> PipelineResult:
    """Round-to-nearest on the same layers GPTQ quantizes, in place: the baseline it must beat."""
    arch = get_arch(model)
    result = PipelineResult(layers={}, modules=[], num_blocks=len(arch.blocks(model)))
    for index, block in enumerate(arch.blocks(model)):
        for name, module in arch.block_linears(block, index).items():
            layer = rtn_quantize(get_weight(module), config)
            set_weight(module, layer.weight)
            result.layers[f"{arch.block_prefix(index)}.{name}"] = layer
    return result
