"""A small Mixtral trained on real text, cached on disk: the mixture of experts whose
quantization quality tests/integration/test_moe_quality.py and bench/moe_quality.py measure.

TinyStories (the fixtures' excerpt, ~30k characters) through babyllama's character tokenizer;
8 experts 64 wide, 2 routed per token, trained with the router's load-balancing loss so that
every expert is used. About 40 s on two CPU cores, the first time a test needs it (or
bench/moe_train.py); the result is kept under $GPTQD_CACHE (default ~/.cache/gptqd) keyed by
the spec, and reused.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from app.tinymodel import train_causal_lm
from tests.conftest import fixture_path

TRAIN_TEXT = ("tinystories", "tinystories_valid_excerpt.txt")
HELD_OUT_TEXT = ("tinystories", "tinystories_sample_cs336.txt")


@dataclass(frozen=True)
class MoeSpec:
    hidden: int = 64
    layers: int = 2
    experts: int = 8
    intermediate: int = 64
    top_k: int = 2
    vocab: int = 128
    steps: int = 300
    seq: int = 128
    batch: int = 16
    lr: float = 3e-3
    seed: int = 0


def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(fixture_path("models", "babyllama-tok105"))


def text_ids(parts: tuple[str, str]) -> torch.Tensor:
    return torch.tensor(tokenizer()(fixture_path(*parts).read_text(), add_special_tokens=False)["input_ids"])


def windows(parts: tuple[str, str], seq: int) -> torch.Tensor:
    ids = text_ids(parts)
    return ids[: ids.numel() // seq * seq].view(-1, seq)


def cache_dir(spec: MoeSpec) -> Path:
    root = Path(os.environ.get("GPTQD_CACHE", Path.home() / ".cache" / "gptqd"))
    key = hashlib.sha256(json.dumps(asdict(spec), sort_keys=True).encode()).hexdigest()[:12]
    return root / f"trained-mixtral-{key}"


def trained_moe(spec: MoeSpec = MoeSpec()) -> Path:
    """The trained model's directory (config, safetensors, tokenizer), trained if not cached."""
    out = cache_dir(spec)
    if (out / "config.json").is_file():
        return out
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=spec.vocab, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers, num_attention_heads=4, num_key_value_heads=2,
        num_local_experts=spec.experts, num_experts_per_tok=spec.top_k,
        max_position_embeddings=512, output_router_logits=True, router_aux_loss_coef=0.02,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )
    torch.manual_seed(spec.seed)
    model = MixtralForCausalLM(config)
    train_causal_lm(model, windows(TRAIN_TEXT, spec.seq), steps=spec.steps, batch=spec.batch,
                    lr=spec.lr, seed=spec.seed)  # with the load-balancing loss
    model.config.output_router_logits = False
    tmp = out.with_name(out.name + ".partial")
    model.save_pretrained(tmp)
    tokenizer().save_pretrained(tmp)
    tmp.rename(out)
    return out
