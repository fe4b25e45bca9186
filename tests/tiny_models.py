"""Tiny random models of every supported architecture, built from a config (no files)."""

from __future__ import annotations

import torch
import transformers as tf

VOCAB = 128
LLAMA_LIKE = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128,
)
# special tokens inside the tiny vocabulary (some configs default to ids in the 50k-250k)
IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
CONFIGS = {
    "llama": lambda: tf.LlamaConfig(**LLAMA_LIKE),
    # a sliding window shorter than the windows: its layers get their own attention mask
    "mistral": lambda: tf.MistralConfig(**LLAMA_LIKE, sliding_window=16),
    "qwen2": lambda: tf.Qwen2Config(**LLAMA_LIKE),  # q/k/v carry biases
    "qwen3": lambda: tf.Qwen3Config(**LLAMA_LIKE, head_dim=16),  # q/k norms inside attention
    "gpt2": lambda: tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=128),
    "opt": lambda: tf.OPTConfig(
        hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
        word_embed_proj_dim=64, vocab_size=VOCAB, max_position_embeddings=128,
    ),
    "gpt_neox": lambda: tf.GPTNeoXConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        vocab_size=VOCAB, max_position_embeddings=128,
    ),
    # local/global layers alternate; attention and final logits soft-capped
    "gemma2": lambda: tf.Gemma2Config(**LLAMA_LIKE, head_dim=16, sliding_window=16, **IDS),
    # q/k norms, sliding layers with their own rotary base
    "gemma3_text": lambda: tf.Gemma3TextConfig(
        **LLAMA_LIKE, head_dim=16, sliding_window=16, **IDS,
        layer_types=["sliding_attention", "full_attention"],
    ),
    # fused qkv_proj [q|k|v] and gate_up_proj [gate|up], quantized as the single linears they are
    "phi3": lambda: tf.Phi3Config(**LLAMA_LIKE, **IDS),
    # attention and MLP in parallel from one LayerNorm; partial rotary
    "phi": lambda: tf.PhiConfig(**{**LLAMA_LIKE, "num_key_value_heads": 4}, **IDS),
    "stablelm": lambda: tf.StableLmConfig(**LLAMA_LIKE, **IDS),
    "granite": lambda: tf.GraniteConfig(**LLAMA_LIKE, **IDS),  # scaled residuals/logits
    "olmo2": lambda: tf.Olmo2Config(**LLAMA_LIKE, **IDS),  # norms after attention/MLP
    "cohere": lambda: tf.CohereConfig(**LLAMA_LIKE, **IDS),  # parallel attention + MLP
}

# mixtures of experts: experts 64 wide, 2 routed per token; built fused (transformers 5)
MOE_CONFIGS = {
    "mixtral": lambda: tf.MixtralConfig(**LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": lambda: tf.Qwen2MoeConfig(
        **LLAMA_LIKE, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
        shared_expert_intermediate_size=128, **IDS,
    ),
    "qwen3_moe": lambda: tf.Qwen3MoeConfig(
        **LLAMA_LIKE, head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64, **IDS,
    ),
}


def tiny_model(model_type: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    config = {**CONFIGS, **MOE_CONFIGS}[model_type]()
    return tf.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
