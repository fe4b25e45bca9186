"""A tiny Llama with its own tokenizer, built on any machine with no download: for the demo
and the service tests. The tokenizer is a byte-level BPE trained in-process on the engine's
built-in text; the weights come from a fixed seed and, optionally, a few training steps on the
same text so that perplexity and generations mean something.
"""

from __future__ import annotations

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


def _corpus() -> list[str]:
    from worker.gptq.calibration import builtin_rows

    return builtin_rows()


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
    """A few AdamW steps on random windows of the corpus: enough to leave random-init noise."""
    import torch

    ids = torch.tensor(tokenizer("\n\n".join(rows), add_special_tokens=False)["input_ids"])
    windows = ids[: ids.numel() // spec.train_seq * spec.train_seq].view(-1, spec.train_seq)
    gen = torch.Generator().manual_seed(spec.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for _ in range(spec.train_steps):
        batch = windows[torch.randint(len(windows), (spec.train_batch,), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def build_tiny_llama(out_dir: Path, spec: TinySpec = TinySpec()) -> Path:
    """Writes config, safetensors weights and tokenizer to out_dir (reused when already built
    with the same spec)."""
    out_dir = Path(out_dir)
    stamp = out_dir / STAMP
    if stamp.is_file() and json.loads(stamp.read_text()) == asdict(spec):
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
    if spec.train_steps:
        _train(model, tokenizer, rows, spec)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    stamp.write_text(json.dumps(asdict(spec)))
    return out_dir
