"""A tiny Llama with its own tokenizer, built on any machine with no download: for the demo
and the service tests. The tokenizer is a byte-level BPE trained in-process on the calibration
part of the engine's builtin English text; the weights come from a fixed seed and, optionally,
a few hundred training steps on the same text so that perplexity and generations mean
something. The builtin held-out text is never trained on: a perplexity measured there is
honest.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

STAMP = "gptqd-tiny.json"


@dataclass(frozen=True)
class TinySpec:
    hidden: int = 64
    layers: int = 2
    intermediate: int = 128
    heads: int = 4
    vocab: int = 512
    context: int = 512
    seed: int = 0
    train_steps: int = 0
    train_seq: int = 64
    train_batch: int = 8
    train_lr: float = 3e-3


def _corpus() -> list[str]:
    from worker.gptq.calibration import BUILTIN, builtin_rows

    return builtin_rows(BUILTIN)


def _corpus_digest() -> str:
    """Names the corpus in the stamp: a model built from older builtin text is rebuilt."""
    from worker.gptq.calibration import BUILTIN, BUILTIN_FILES, DATA_DIR

    return hashlib.sha256((DATA_DIR / BUILTIN_FILES[BUILTIN]).read_bytes()).hexdigest()[:16]


def train_tokenizer(rows: list[str], vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(rows, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="</s>",
    )


def _train(model, tokenizer, rows: list[str], spec: TinySpec) -> None:
    import torch

    ids = torch.tensor(tokenizer("\n\n".join(rows), add_special_tokens=False)["input_ids"])
    windows = ids[: ids.numel() // spec.train_seq * spec.train_seq].view(-1, spec.train_seq)
    train_causal_lm(model, windows, steps=spec.train_steps, batch=spec.train_batch,
                    lr=spec.train_lr, seed=spec.seed)


def train_causal_lm(model, windows, *, steps: int, batch: int, lr: float, seed: int) -> None:
    """AdamW steps on random rows of `windows` ([n, seq] token ids), seeded: enough to leave
    random-init noise. Whatever the model adds to its .loss (a mixture of experts' load-balancing
    loss, when its config asks for router logits) is trained too."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        rows = windows[torch.randint(len(windows), (batch,), generator=gen)]
        loss = model(input_ids=rows, labels=rows).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def build_tiny_llama(out_dir: Path, spec: TinySpec = TinySpec()) -> Path:
    """Writes config, safetensors weights and tokenizer to out_dir (reused when already built
    with the same spec)."""
    out_dir = Path(out_dir)
    stamp = out_dir / STAMP
    built_from = {**asdict(spec), "corpus": _corpus_digest()}
    if stamp.is_file() and json.loads(stamp.read_text()) == built_from:
        return out_dir
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    rows = _corpus()
    tokenizer = train_tokenizer(rows, spec.vocab)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=spec.hidden, intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
        num_key_value_heads=spec.heads, max_position_embeddings=spec.context,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config)
    # greedy decoding loops on a model this small ("the course of the course of..."); like a
    # real model's shipped generation config, this one says how to sample it
    model.generation_config.no_repeat_ngram_size = 3
    if spec.train_steps:
        _train(model, tokenizer, rows, spec)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    stamp.write_text(json.dumps(built_from))
    return out_dir
