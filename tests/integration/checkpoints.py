"""Helpers shared by the streaming and resume tests: tiny models and checkpoint comparison."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers as tf
from safetensors.torch import load_file
from transformers import AutoTokenizer

from tests.conftest import fixture_path

# the files that define a checkpoint (the report and log also hold timings, which differ)
DEFINING_FILES = ("config.json", "quantize_config.json", "generation_config.json")


def tiny_llama(path: Path, layers: int = 4, tie: bool = False, hidden: int = 64,
               vocab: int = 128, max_shard_size: str | None = None) -> Path:
    """A random Llama (hidden 64, MLP twice as wide) with the babyllama fixture's character
    tokenizer (a larger vocab makes larger files: the rows past the tokenizer's go unused)."""
    torch.manual_seed(0)
    config = tf.LlamaConfig(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=256,
        tie_word_embeddings=tie,
    )
    shards = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    tf.LlamaForCausalLM(config).save_pretrained(path, **shards)
    AutoTokenizer.from_pretrained(fixture_path("models", "babyllama-tok105")).save_pretrained(path)
    return path


def saved_tiny_model(model_type: str, path: Path) -> Path:
    """tests/tiny_models.py's model of that type, saved with the babyllama character tokenizer."""
    from tests.tiny_models import tiny_model

    tiny_model(model_type).save_pretrained(path)
    AutoTokenizer.from_pretrained(fixture_path("models", "babyllama-tok105")).save_pretrained(path)
    return path


def assert_same_checkpoint(a: Path, b: Path) -> int:
    """Every tensor equal (dtype, shape, bits) and the same config files; returns the count."""
    first, second = _tensors(a), _tensors(b)
    assert first.keys() == second.keys()
    for key, tensor in first.items():
        other = second[key]
        assert tensor.dtype == other.dtype and torch.equal(tensor, other), key
    for name in DEFINING_FILES:
        assert (a / name).read_text() == (b / name).read_text(), name
    return len(first)


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(path))
    assert tensors, f"no weights in {directory}"
    return tensors
